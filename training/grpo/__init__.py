"""Graph-GRPO (GRAPH_GRPO.md): rewards of parsed rollouts, credit propagation over the reasoning graph,
the advantage estimators registered by name, the main-loss-driven edge controller, the policy-gradient
loss, and the trainer command over them.

The math is pure functions of tensors and scalars; no optimizer (apart from the controller's own),
logger, files or config objects. Modules: `rewards` (NodeRewards, score_rollouts), `credit` (CreditGraph,
node_credit, node_credit_reference, group_normalize), `estimators` (ESTIMATORS, get_estimator,
AdvantageBatch, AdvantageParams), `controller` (EdgeController, token_alignment, lookahead_gradient),
`loss` (StepParams, policy_loss, surrogate_token_losses, aggregation_weights, k3_kl).
Around them: `batch` (rollouts packed as tensors, the model's response logprobs, the token-node index),
`rollout` and `vllm_backend` (the rollout backends), `trainer` (`relevance train grpo`).
"""
