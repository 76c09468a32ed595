"""An allocation that fails inside a loss (or its backward) is recorded ``oom``, also when the
fitness plug-in wraps it as an error naming the training step (cifar10, dpo, synthetic-pref do)."""
from __future__ import annotations

import json

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
