"""Graph-GRPO's math (GRAPH_GRPO.md): rewards of parsed rollouts, credit propagation over the reasoning
graph, the advantage estimators registered by name, and the main-loss-driven edge controller.

Pure functions of tensors and scalars; no optimizer (apart from the controller's own), logger, files
or config objects. Modules: `rewards` (NodeRewards, score_rollouts), `credit` (CreditGraph,
node_credit, node_credit_reference, group_normalize), `estimators` (ESTIMATORS, get_estimator,
AdvantageBatch, AdvantageParams), `controller` (EdgeController, token_alignment, lookahead_gradient).
"""
