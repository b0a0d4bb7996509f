"""The run folder loads checkpoints without running code: a planted `state.pt` is refused, naming the file,
while every state the trainers save (model, optimizer, grad scaler, edge controller) still round-trips."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from training.grpo.controller import ControllerParams, EdgeController
from training.loop import resume_state
from training.run_folder import CheckpointError, RunFolder


class _TouchOnUnpickle:
    """Unpickling it creates `marker`: stands in for any code a hostile pickle would run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_planted_checkpoint_is_refused_naming_the_file_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    planted = tmp_path / "run" / "checkpoints" / "step-000009" / "state.pt"
    planted.parent.mkdir(parents=True)
    torch.save({"step": 9, "model": _TouchOnUnpickle(marker)}, planted)
    with pytest.raises(CheckpointError, match=f"{planted}.*could run code"):
        resume_state(RunFolder(tmp_path / "run", {}), True, model=torch.nn.Linear(2, 1))
    assert not marker.exists()


def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    folder = RunFolder(tmp_path, {})
    saved = folder.save_checkpoint(2, {"model": torch.nn.Linear(2, 1).state_dict()}) / "state.pt"
    saved.write_bytes(saved.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=f"{saved}.*truncated or corrupt"):
        folder.start(resume=True)


def test_a_run_killed_while_saving_resumes_from_the_checkpoint_before(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path, {})
    folder.save_checkpoint(1, {"model": torch.nn.Linear(2, 1).state_dict()})
    real_save = torch.save

    def killed_halfway(state, path):
        real_save(state, path)
        pathlib.Path(path).write_bytes(pathlib.Path(path).read_bytes()[:40])
        raise KeyboardInterrupt  # the process stops here, the file torn

    monkeypatch.setattr(torch, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        folder.save_checkpoint(2, {"model": torch.nn.Linear(2, 1).state_dict()})
    monkeypatch.undo()

    assert folder.latest_checkpoint() == tmp_path / "checkpoints" / "step-000001" / "state.pt"
    assert resume_state(folder, True, model=torch.nn.Linear(2, 1)) == 1


def test_a_staging_copy_left_by_a_killed_save_is_removed_when_the_run_starts_again(tmp_path):
    folder = RunFolder(tmp_path, {})
    saved = folder.save_checkpoint(1, {"model": torch.nn.Linear(2, 1).state_dict()})
    left = saved / ".staging-state.pt-0123abcd"  # SIGKILL between writing and renaming: no `finally` ran
    left.write_bytes(b"torn")
    assert resume_state(RunFolder(tmp_path, {}), True, model=torch.nn.Linear(2, 1)) == 1
    assert not left.exists() and (saved / "state.pt").is_file()


def test_a_checkpoint_written_with_other_settings_is_refused_naming_the_file_and_each_change(tmp_path):
    written = {"out": "runs/a", "lr": 0.004, "seed": 0, "processes": 2, "max_steps": 100}
    saved = RunFolder(tmp_path, written).save_checkpoint(3, {"model": torch.nn.Linear(2, 1).state_dict()}) / "state.pt"
    other_run = {**written, "lr": 0.002, "seed": 1}
    with pytest.raises(CheckpointError, match=rf"{saved}: refused to resume: written by a run with other settings "
                                              r"\(lr 0.004 -> 0.002; seed 0 -> 1\); .*resume=false"):
        resume_state(RunFolder(tmp_path, other_run), True, model=torch.nn.Linear(2, 1))
    assert resume_state(RunFolder(tmp_path, other_run), False, model=torch.nn.Linear(2, 1)) == 0  # started afresh

    # where it runs, on how many processes and for how long are not the run's identity: a run moved or extended resumes
    moved_and_extended = {**written, "out": "runs/b", "processes": 1, "max_steps": 300}
    assert resume_state(RunFolder(tmp_path, moved_and_extended), True, model=torch.nn.Linear(2, 1)) == 3


def test_a_checkpoint_from_before_checkpoints_held_settings_resumes_with_a_warning(tmp_path, caplog):
    old = tmp_path / "checkpoints" / "step-000002" / "state.pt"
    old.parent.mkdir(parents=True)
    torch.save({"step": 2, "model": torch.nn.Linear(2, 1).state_dict()}, old)
    assert resume_state(RunFolder(tmp_path, {"lr": 0.1}), True, model=torch.nn.Linear(2, 1)) == 2
    assert f"{old}: written before checkpoints held their run's settings" in caplog.text


def test_optimizer_scaler_and_controller_states_round_trip_under_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # creates the scale tensor a state dict reads
    controller = EdgeController([("a", "y"), ("b", "y")], ControllerParams(lr=0.1))
    controller.update(torch.tensor([1.0, -2.0]))
    RunFolder(tmp_path, {}).save_checkpoint(1, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "scaler": scaler.state_dict(), "controller": controller.state_dict()})

    restored = torch.nn.Linear(3, 2)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=0.1)
    restored_scaler = torch.amp.GradScaler("cpu")
    restored_controller = EdgeController([("a", "y"), ("b", "y")], ControllerParams(lr=0.1))
    step = resume_state(RunFolder(tmp_path, {}), True, model=restored, optimizer=restored_optimizer,
                        scaler=restored_scaler, controller=restored_controller)

    assert step == 1
    assert restored_scaler.state_dict() == scaler.state_dict()
    assert torch.equal(restored_controller.phi(), controller.phi()) and int(restored_controller.updates) == 1
    assert str(restored_optimizer.state_dict()) == str(optimizer.state_dict())
    controller.update(torch.tensor([0.2, -0.7]))
    restored_controller.update(torch.tensor([0.2, -0.7]))
    assert torch.equal(restored_controller.theta, controller.theta)


def test_a_model_folder_with_pickled_weights_only_is_refused(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from training.model import load_model
    from training.model_files import ModelFolderError

    pickled = shutil.copytree(tiny_model, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"only pickled weights \(pytorch_model.bin\).*safe_serialization=True"):
        load_model(pickled)
