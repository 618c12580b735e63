"""The machine record every benchmark JSON carries."""

from __future__ import annotations

import json
import os

import torch

from medseg.benchmark.machine import machine_facts


def test_machine_facts_describe_this_process():
    facts = machine_facts()
    assert facts["cpu_count"] == os.cpu_count() and facts["torch"] == torch.__version__
    assert facts["torch_threads"] == torch.get_num_threads() and isinstance(facts["cpu_bf16"], bool)
    assert facts["cpu"] and (facts["gpu"] is None) == (not torch.cuda.is_available())
    json.dumps(facts)  # it goes into benchmark JSON files as is
