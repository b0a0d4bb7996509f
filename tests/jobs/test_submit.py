"""`jobs/submit.py`: every job it names resolves to a module with that config class and a `run`."""

import importlib

import pytest

from jobs.submit import JOBS, main


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_submittable_job_has_its_config_and_run(job):
    module_name, config_name = JOBS[job]
    module = importlib.import_module(module_name)
    assert hasattr(module, config_name) and callable(module.run)


def test_an_unknown_job_is_refused():
    with pytest.raises(SystemExit):
        main(["train"])
