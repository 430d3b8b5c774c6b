"""Dependency groups are proven by exactness: removing channels equals zeroing what they contribute.

For a random group and a random subset of its channels, (a) zeroes the channels' consumer slices
(the down-projection rows of FFN channels, the o-projection rows of heads, the next convs' input
channels) in the original, and (b) removes them with `remove_channels`. The outputs must agree
within fp32 1e-5 relative, and (b)'s constants must be smaller by exactly the removed slices.
Vocabulary groups have no consumer inside the model: (a) zeroes the head's columns and the logits
are compared at the kept ids, on inputs that only use kept ids (remapped for (b)).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.groups import Group, remove_channels, zero_channels
from slimgraph.ir.structure import discover
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from tests.conftest import LIGHT_DIR, copy_model

RTOL = 1e-5
# Every case builds two ONNX Runtime sessions: no shrinking (a failure names its group and channels).
SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.reuse, Phase.generate])


def slice_bytes(model: ir.Model, group: Group) -> int:
    """Bytes of the group's constants (a ConstantOfShape weight counted as the tensor it makes)."""
    return sum(edit.constant_array(v).nbytes for v in {s.value for s in group.slices})


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def check_group(model: ir.Model, index: int, channels: list[int], feeds: dict[str, np.ndarray]) -> None:
    zeroed, removed = copy_model(model), copy_model(model)
    group_a, group_b = discover(zeroed).groups[index], discover(removed).groups[index]
    before = slice_bytes(removed, group_b)
    expected_saving = group_b.removed_bytes(channels)
    remove_channels(removed, {group_b: channels})
    assert expected_saving > 0
    assert before - slice_bytes(removed, group_b) == expected_saving
    if group_a.kind == "vocab":
        kept = np.setdiff1d(np.arange(group_a.size), channels)
        remap = np.full(group_a.size, -1)
        remap[kept] = np.arange(kept.size)
        feeds = {k: (kept[v % kept.size] if k == "input_ids" else v) for k, v in feeds.items()}
        want = evaluate.run(model, feeds)
        got = evaluate.run(removed, {k: (remap[v] if k == "input_ids" else v) for k, v in feeds.items()})
        for name, value in got.items():
            if value.shape[-1] == kept.size and want[name].shape[-1] == group_a.size:
                assert relative(want[name][..., kept], value) <= RTOL, name
            else:
                assert relative(want[name], value) <= RTOL, name
        return
    zero_channels(zeroed, group_a, channels)
    want, got = evaluate.run(zeroed, feeds), evaluate.run(removed, feeds)
    for name in want:
        assert relative(want[name], got[name]) <= RTOL, (group_a, channels, name, relative(want[name], got[name]))


def channel_subsets(group: Group) -> st.SearchStrategy[list[int]]:
    """Random channel subsets a group accepts (the same number from every part: GQA KV groups, conv groups)."""
    if group.parts is None:
        return st.lists(st.integers(0, group.size - 1), min_size=1, max_size=group.size - 1, unique=True)
    members = [np.flatnonzero(group.parts == p) for p in range(int(group.parts.max()) + 1)]
    per_part = min(len(m) for m in members)

    def pick(data: tuple[int, int]) -> list[int]:
        count, seed = data
        rng = np.random.default_rng(seed)
        return sorted(int(c) for m in members for c in rng.choice(m, size=count, replace=False))

    return st.tuples(st.integers(1, per_part - 1), st.integers(0, 2**16)).map(pick)


def run_property(model: ir.Model, feeds: dict[str, np.ndarray], examples: int, kinds: set[str]) -> None:
    """`examples` random cases, shared evenly by the group kinds (each kind is covered)."""
    groups = discover(copy_model(model)).groups
    assert {g.kind for g in groups} >= kinds, collections.Counter(g.kind for g in groups)
    by_kind = collections.defaultdict(list)
    for i, g in enumerate(groups):
        by_kind[g.kind].append(i)
    for kind in sorted(by_kind):

        @settings(max_examples=max(1, examples // len(by_kind)), **SETTINGS)
        @given(st.data())
        def case(data: st.DataObject) -> None:
            index = data.draw(st.sampled_from(by_kind[kind]))
            check_group(model, index, data.draw(channel_subsets(groups[index])), feeds)

        case()


# --- transformers ---------------------------------------------------------------------------


def text_feeds(model: ir.Model, seq: int = 7) -> dict[str, np.ndarray]:
    return sample_inputs(model, batch=2, sequence=seq, seed=3)


@pytest.mark.slow
def test_minilm_groups_are_exact(minilm):
    run_property(minilm, text_feeds(minilm), examples=20, kinds={"ffn", "heads"})


@pytest.mark.slow
def test_gpt2_groups_are_exact(gpt2_ir):
    run_property(gpt2_ir, text_feeds(gpt2_ir), examples=60, kinds={"ffn", "heads", "vocab"})


@pytest.fixture(scope="module")
def llama_gqa(tmp_path_factory) -> ir.Model:
    """A Llama with 8 query heads in 2 KV groups (grouped-query attention)."""
    import torch
    import transformers

    from slimgraph.frontend import load

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    folder = tmp_path_factory.mktemp("llama_gqa")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return load(folder)


@pytest.mark.slow
def test_llama_gqa_groups_are_exact(llama_gqa):
    run_property(llama_gqa, text_feeds(llama_gqa), examples=60, kinds={"ffn", "heads", "kv-heads", "vocab"})


@pytest.mark.slow
def test_smollm2_groups_are_exact(smollm2):
    found = discover(copy_model(smollm2))
    counts = collections.Counter(g.kind for g in found.groups)
    assert counts == {"ffn": 30, "heads": 30, "kv-heads": 30, "vocab": 1}, counts
    run_property(smollm2, text_feeds(smollm2, seq=5), examples=8, kinds={"ffn", "heads", "kv-heads", "vocab"})


def test_gqa_needs_the_same_number_from_every_kv_group(llama_gqa):
    heads = discover(copy_model(llama_gqa)).groups_of("heads")[0]
    with pytest.raises(SlimgraphError, match="remove the same number from each"):
        heads.check([0, 1, 4])
    with pytest.raises(SlimgraphError, match="would remove the layer"):
        heads.check(range(8))


# --- CNNs -----------------------------------------------------------------------------------

CNN_EXAMPLES = {"light_resnet50": 20, "light_densenet121": 4, "light_inception_v1": 5, "light_inception_v2": 5,
                "light_squeezenet": 10, "light_vgg19": 3, "light_bvlc_alexnet": 3, "light_zfnet512": 3}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CNN_EXAMPLES))
def test_cnn_channel_groups_are_exact(name):
    model = ir.load(LIGHT_DIR / f"{name}.onnx")
    run_property(model, sample_inputs(model, batch=1, seed=1), examples=CNN_EXAMPLES[name], kinds={"channels"})


def test_shufflenet_says_why_its_channels_stay():
    found = discover(ir.load(LIGHT_DIR / "light_shufflenet.onnx"))
    assert found.groups_of("channels") == []
    assert any("grouped (4 groups) conv" in note for note in found.not_prunable)
    assert any("depthwise" in note for note in found.not_prunable)
