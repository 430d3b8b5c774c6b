import numpy as np
import onnx_ir as ir

from slimgraph.ir.opset import upgrade_opset
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from tests.conftest import LIGHT_DIR


def test_upgrade_old_opset_keeps_outputs():
    model = ir.load(LIGHT_DIR / "light_squeezenet.onnx")
    assert model.opset_imports[""] == 9
    feeds = sample_inputs(model)
    before = evaluate.run(model, feeds)
    assert upgrade_opset(model, 17)
    assert model.opset_imports[""] == 17 and model.ir_version >= 8
    after = evaluate.run(model, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-7)
    assert not upgrade_opset(model, 13)  # already newer
