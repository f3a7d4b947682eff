"""Model transforms and mode switches: exact restoration of what they change."""
from __future__ import annotations

import pytest
from torch import nn

from replication.models.surgery import eval_mode


def test_eval_mode_restores_every_modules_own_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, False, True]
