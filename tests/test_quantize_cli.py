"""`compressor export --precision int8`: refused in one line without data, written and reported with it."""

from __future__ import annotations

import json

import onnx
import pytest

from compressor.cli.main import main


@pytest.mark.parametrize(("extra", "message"), [
    ([], "--precision int8 needs --data"),
    (["--data", "digits32", "--format", "torch"], "int8 is available for onnx, openvino, tensorrt, not torch"),
    (["--data", "digits32", "--min-agreement", "101"], "top-1 agreement is a percentage"),
])
def test_int8_export_refuses_bad_input_in_one_line(extra, message, tmp_path, capsys):
    args = ["export", "--model", "resnet56", "--format", "onnx", "--precision", "int8", "--out", str(tmp_path / "o"),
            *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("compressor export: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()


def test_int8_export_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "int8"
    code = main(["export", "--model", "resnet56", "--data", "digits32", "--format", "onnx", "--precision", "int8",
                 "--calibration-size", "64", "--calibrate", "percentile", "--out", str(out), "--json"])
    assert code == 0
    written = json.loads(capsys.readouterr().out)["onnx"]  # stdout is the JSON alone
    assert written["path"] == str(out / "model.onnx") and written["precision"] == "int8"
    assert written["quantizer"]["calibrate_method"] == "Percentile" and written["quantizer"]["format"] == "QDQ"
    assert written["fidelity"]["top1_agreement"] >= 97.0 and written["floor"]["min_sqnr_db"] == 10.0
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(written["path"]).graph.node}
    assert main(["export", "--model", "resnet56", "--data", "digits32", "--format", "onnx", "--precision", "int8",
                 "--out", str(out)]) == 2  # nothing is overwritten
