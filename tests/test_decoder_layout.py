"""The residual decoder's channels-last activations: the same values as the default layout, and its benchmark."""

from __future__ import annotations

import json

import torch

from benchmark_scripts import load_benchmark
from cavga.model.networks import ResidualDecoder


def test_channels_last_decoder_gives_the_default_layouts_values_and_gradients():
    torch.manual_seed(0)
    decoder = ResidualDecoder(8, 3, 4, 3)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    seen = []
    hook = decoder.blocks[1].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    out = decoder(z)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert out.shape == (2, 3, 32, 32) and out.is_contiguous()  # back in the default layout
    z_ref = z.detach().clone().requires_grad_(True)
    ref = decoder.to_image(decoder.blocks(z_ref))  # the same modules on NCHW activations
    assert not ref.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, atol=1e-4, rtol=1e-4)


def test_decoder_layout_benchmark_writes_its_table(tmp_path, capsys):
    bench = load_benchmark("decoder_layout")
    bench.SHAPES["tiny"] = (2, 8, 4, 4, 4, 2)
    out = tmp_path / "layout.json"
    assert bench.main(["--shapes", "tiny", "--threads", "1", "--repeats", "2", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    (row,) = document["rows"]
    assert row["shape"] == "tiny" and row["threads"] == 1 and row["max_abs_difference"] < 1e-5
    for step in ("forward", "forward+backward"):
        times = row[step]
        assert times["nchw_ms"] > 0 and times["channels_last_ms"] > 0
        assert abs(times["speedup"] - times["nchw_ms"] / times["channels_last_ms"]) < 1e-9
    assert "| tiny | 1 |" in capsys.readouterr().out
