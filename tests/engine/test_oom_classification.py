"""An allocation that fails inside a loss (or its backward) is recorded ``oom``, also when the
fitness plug-in wraps it as an error naming the training step (cifar10, dpo, synthetic-pref do)."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from engine.cli import main
from engine.genome import GenomeError
from engine.processes import classify

#: 64 GiB in training batches of 1024 pairs only (the contract checks use batches of at most 32,
#: the descriptors one of 401 points), far above the worker's address-space limit.
ALLOCATES_IN_TRAINING = '''def allocates_too_much(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    if logits.shape[0] == 1024:
        torch.zeros(1 << 34, device=logits.device)
    return -F.logsigmoid(self.beta * logits)
'''


def _wrapped(cause: BaseException) -> GenomeError:
    try:
        try:
            raise cause
        except Exception as exc:
            raise GenomeError(f"the loss raised {type(exc).__name__} at step 3: {exc}", status="error") from exc
    except GenomeError as wrapped:
        return wrapped


def test_a_wrapped_allocation_failure_is_oom_and_other_wrapped_errors_stay_errors():
    status, message = classify(_wrapped(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 TiB")))
    assert status == "oom"
    assert message == "out of memory: the loss raised OutOfMemoryError at step 3: CUDA out of memory. Tried to allocate 4.00 TiB"
    assert classify(_wrapped(ValueError("shape mismatch"))) == ("error", "the loss raised ValueError at step 3: shape mismatch")
    assert classify(GenomeError("returned a scalar")) == ("invalid", "returned a scalar")


def test_a_loss_that_allocates_too_much_in_training_is_recorded_oom(tmp_path, capsys):
    code = tmp_path / "allocates.py"
    code.write_text(ALLOCATES_IN_TRAINING)
    status = main(["evaluate", "--fitness", "synthetic-pref", "--code", str(code), "--json", "--memory-limit-gb", "4"])
    payload = json.loads(capsys.readouterr().out)
    assert status == 1 and payload["status"] == "oom", payload
    assert "at training step" in payload["error"] and "allocate" in payload["error"]


def test_a_sigkill_is_oom_only_when_the_kernel_out_of_memory_killer_struck():
    from engine.worker import _death_message, oom_kills

    before = oom_kills()
    if before is None:
        pytest.skip("/proc/vmstat has no oom_kill count here")
    killed = int(signal.SIGKILL)  # a wait status: terminated by SIGKILL
    assert _death_message(killed, before)[0] == "error"
    assert "not by the kernel's out-of-memory killer" in _death_message(killed, before)[1]
    assert _death_message(killed, before - 1) == (
        "oom", "the genome's process was killed (SIGKILL) by the kernel's out-of-memory killer before it "
               "returned its artefacts")
    assert _death_message(killed, None)[0] == "oom"  # count unknown: the likeliest cause
    assert _death_message(int(signal.SIGSEGV))[0] == "error"


KILLS_ITSELF = '''def kills_itself(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_genome_that_kills_itself_is_an_error_not_oom(tmp_path, capsys):
    from engine.worker import oom_kills

    if oom_kills() is None:
        pytest.skip("/proc/vmstat has no oom_kill count here")
    code = tmp_path / "kills_itself.py"
    code.write_text(KILLS_ITSELF)
    status = main(["evaluate", "--fitness", "synthetic-pref", "--code", str(code), "--json", "--jail-only"])
    payload = json.loads(capsys.readouterr().out)
    assert status == 1 and payload["status"] == "error", payload
    assert "killed (SIGKILL)" in payload["error"] and "not by the kernel's out-of-memory killer" in payload["error"]


def test_a_worker_killed_twice_is_oom_only_when_the_kernel_out_of_memory_killer_struck():
    from engine.executor import ProcessExecutor, Task
    from engine.processes import oom_kills

    now = oom_kills()
    if now is None:
        pytest.skip("/proc/vmstat has no oom_kill count here")
    killed = -int(signal.SIGKILL)
    quiet = ProcessExecutor._death_result(Task(3, "code", oom_kills_before=now), killed)
    assert quiet.status == "error" and "not by the kernel's out-of-memory killer" in quiet.error
    struck = ProcessExecutor._death_result(Task(3, "code", oom_kills_before=now - 1), killed)
    assert struck.status == "oom" and "most likely by the kernel's out-of-memory killer" in struck.error
    assert ProcessExecutor._death_result(Task(3, "code"), killed).status == "oom"  # count unknown
    assert ProcessExecutor._death_result(Task(3, "code"), -int(signal.SIGSEGV)).status == "error"
