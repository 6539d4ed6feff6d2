"""The continual experiment's memory arms: which admission threshold each arm reads with."""

import dataclasses

import torch
from monim.model_client import MemoryClient
from monim.model_client.continual import ContinualConfig, MemoryArm
from monim.model_client.text_data import tiny_gpt2

CONFIG = ContinualConfig(length=16, batch=2, k=4, admit_below=-50.0)


def _arms(config):
    client = MemoryClient(":memory:")
    base = tiny_gpt2(32, 1, 2, n_positions=64, seed=0)
    return {mode: MemoryArm(mode, base, client, mode, config, 32) for mode in ("knnlm", "monim")}


def test_knnlm_admits_with_its_own_threshold_and_the_monim_arms_with_admit_below():
    inputs = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    arms = _arms(dataclasses.replace(CONFIG, knnlm_admit_below=0.0))
    try:
        for arm in arms.values():
            arm.step(inputs, admitting=True)
        knnlm, monim = arms["knnlm"].handle, arms["monim"].handle
        assert (knnlm.admit_below, monim.admit_below) == (0.0, -50.0)
        assert knnlm.tokens_admitted == knnlm.tokens_seen == 2 * 15  # log p < 0: every token
        assert monim.tokens_seen == 2 * 15 and monim.tokens_admitted == 0  # no log p is below -50
    finally:
        for arm in arms.values():
            arm.close()


def test_without_its_own_threshold_knnlm_uses_admit_below():
    arms = _arms(CONFIG)
    try:
        assert arms["knnlm"].handle.admit_below == arms["monim"].handle.admit_below == -50.0
    finally:
        for arm in arms.values():
            arm.close()
