"""Every registered op, called directly (torch.ops.sloth.* is public API) with inconsistent arguments: each call
must raise (RuntimeError from the C++ TORCH_CHECKs), never crash the process. The calls run in a subprocess, so
that a segfault / SIGFPE / abort shows up as a failure naming the call instead of killing pytest. (Before the C++
checks: a shape larger than the packed data segfaulted nf4_dequantize, blocksize 0 divided by zero, K = 0 in
mxfp4_quantize raised SIGFPE, short scales / codes were read out of bounds.)"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import DEVICES


def cases(device):
    """(name, thunk) pairs: each thunk calls one op with one inconsistent argument."""
    ops = torch.ops.sloth
    dev = torch.device(device)

    def t(*shape, dtype=torch.float32):
        if dtype.is_floating_point:
            return torch.randn(shape).to(dtype).to(dev)
        return torch.zeros(shape, dtype=dtype, device=dev)

    x = t(4, 64)
    packed, absmax = ops.nf4_quantize(x, 64)  # [128, 1] u8, [4] f32
    code = t(256)
    qa, a2 = ops.blockwise8_quantize(absmax, code, 256)  # uint8 absmax, [1] absmax2
    off = t(1)
    blocks, scales = ops.mxfp4_quantize(t(3, 64))  # [3, 2, 16], [3, 2]
    xb = t(2, 64, dtype=torch.bfloat16)
    lg = t(3, 10)
    lab = torch.tensor([1, 2, 3], device=dev)
    rope_args = (t(5, 2, 16), t(5, 1, 16), t(5, 16), t(5, 16))
    c = [
        ("nf4_quantize blocksize 0", lambda: ops.nf4_quantize(x, 0)),
        ("nf4_quantize blocksize -64", lambda: ops.nf4_quantize(x, -64)),
        ("nf4_quantize blocksize 48", lambda: ops.nf4_quantize(x, 48)),
        ("nf4_quantize int x", lambda: ops.nf4_quantize(t(4, 64, dtype=torch.int32), 64)),
        ("nf4_dequantize shape larger than packed", lambda: ops.nf4_dequantize(packed, absmax, [400, 64], 64,
                                                                               torch.float32)),
        ("nf4_dequantize negative shape", lambda: ops.nf4_dequantize(packed, absmax, [-4, 64], 64, torch.float32)),
        ("nf4_dequantize blocksize 0", lambda: ops.nf4_dequantize(packed, absmax, [4, 64], 0, torch.float32)),
        ("nf4_dequantize short absmax", lambda: ops.nf4_dequantize(packed, absmax[:2], [4, 64], 64, torch.float32)),
        ("nf4_dequantize float packed", lambda: ops.nf4_dequantize(t(128, 1), absmax, [4, 64], 64, torch.float32)),
        ("nf4_dequantize int dtype", lambda: ops.nf4_dequantize(packed, absmax, [4, 64], 64, torch.int32)),
        ("nf4_dequantize uint8 absmax alone", lambda: ops.nf4_dequantize(packed, qa, [4, 64], 64, torch.float32)),
        ("nf4_dequantize short code2", lambda: ops.nf4_dequantize(packed, qa, [4, 64], 64, torch.float32, code[:10],
                                                                  a2, off, 256)),
        ("nf4_dequantize short absmax2", lambda: ops.nf4_dequantize(packed, qa, [4, 64], 64, torch.float32, code,
                                                                    a2[:0], off, 256)),
        ("nf4_dequantize empty offset", lambda: ops.nf4_dequantize(packed, qa, [4, 64], 64, torch.float32, code, a2,
                                                                   off[:0], 256)),
        ("nf4_dequantize blocksize2 3", lambda: ops.nf4_dequantize(packed, qa, [4, 64], 64, torch.float32, code, a2,
                                                                   off, 3)),
        ("nf4_dequantize_out wrong numel", lambda: ops.nf4_dequantize_out(packed, absmax, 64, None, None, None, 256,
                                                                          t(8, 64))),
        ("nf4_dequantize_out strided out", lambda: ops.nf4_dequantize_out(packed, absmax, 64, None, None, None, 256,
                                                                          t(64, 4).t())),
        ("nf4_dequantize_out int out", lambda: ops.nf4_dequantize_out(packed, absmax, 64, None, None, None, 256,
                                                                      t(4, 64, dtype=torch.int32))),
        ("blockwise8_quantize blocksize 0", lambda: ops.blockwise8_quantize(x, code, 0)),
        ("blockwise8_quantize short code", lambda: ops.blockwise8_quantize(x, code[:10], 64)),
        ("blockwise8_quantize int code", lambda: ops.blockwise8_quantize(x, t(256, dtype=torch.int32), 64)),
        ("mxfp4_quantize K 48", lambda: ops.mxfp4_quantize(t(4, 48))),
        ("mxfp4_quantize 0-d", lambda: ops.mxfp4_quantize(t())),
        ("mxfp4_quantize int x", lambda: ops.mxfp4_quantize(t(4, 64, dtype=torch.int32))),
        ("mxfp4_dequantize short scales", lambda: ops.mxfp4_dequantize(blocks, scales[:, :1], torch.float32)),
        ("mxfp4_dequantize 8-byte blocks", lambda: ops.mxfp4_dequantize(blocks[..., :8], scales, torch.float32)),
        ("mxfp4_dequantize float scales", lambda: ops.mxfp4_dequantize(blocks, scales.float(), torch.float32)),
        ("mxfp4_dequantize 1-d blocks", lambda: ops.mxfp4_dequantize(blocks.reshape(-1), scales, torch.float32)),
        ("mxfp4_dequantize int dtype", lambda: ops.mxfp4_dequantize(blocks, scales, torch.int32)),
        ("nf4_gemv_lora packed for another shape", lambda: ops.nf4_gemv_lora(xb, packed, absmax, 8, 64, None, None,
                                                                              None, 256, None, None, 1.0, None)),
        ("nf4_gemv_lora 1-d x", lambda: ops.nf4_gemv_lora(xb[0], packed, absmax, 4, 64, None, None, None, 256, None,
                                                          None, 1.0, None)),
        ("nf4_gemv_lora lora_B shape", lambda: ops.nf4_gemv_lora(xb, packed, absmax, 4, 64, None, None, None, 256,
                                                                 t(2, 3), t(5, 3), 1.0, None)),
        ("nf4_gemv_lora lora_t alone", lambda: ops.nf4_gemv_lora(xb, packed, absmax, 4, 64, None, None, None, 256,
                                                                 t(2, 3), None, 1.0, None)),
        ("nf4_gemv_lora bias length", lambda: ops.nf4_gemv_lora(xb, packed, absmax, 4, 64, None, None, None, 256,
                                                                None, None, 1.0, t(7))),
        ("nf4_gemv_lora negative out_features", lambda: ops.nf4_gemv_lora(xb, packed, absmax, -4, 64, None, None,
                                                                          None, 256, None, None, 1.0, None)),
        ("glu_forward shapes", lambda: ops.glu_forward(t(4, 8), t(4, 9), 0)),
        ("glu_forward dtypes", lambda: ops.glu_forward(t(4, 8), t(4, 8, dtype=torch.bfloat16), 0)),
        ("glu_forward kind 5", lambda: ops.glu_forward(t(4, 8), t(4, 8), 5)),
        ("glu_forward int", lambda: ops.glu_forward(t(4, 8, dtype=torch.int32), t(4, 8, dtype=torch.int32), 0)),
        ("glu_backward grad shape", lambda: ops.glu_backward(t(4, 7), t(4, 8), t(4, 8), 0)),
        ("glu_backward strided gate", lambda: ops.glu_backward(t(8, 4).t(), t(8, 4).t(), t(4, 8), 0)),
        ("glu_backward gate is up", lambda: (lambda g: ops.glu_backward(t(4, 8), g, g, 0))(t(4, 8))),
        ("glu_backward kind -1", lambda: ops.glu_backward(t(4, 8), t(4, 8), t(4, 8), -1)),
        ("cross_entropy_chunk short labels", lambda: ops.cross_entropy_chunk(lg, lab[:2], None, None, 1.0, -100,
                                                                             0.0, 1.0, True)),
        ("cross_entropy_chunk 1-d logits", lambda: ops.cross_entropy_chunk(t(10), lab, None, None, 1.0, -100, 0.0,
                                                                           1.0, True)),
        ("cross_entropy_chunk strided logits", lambda: ops.cross_entropy_chunk(t(10, 3).t(), lab, None, None, 1.0,
                                                                               -100, 0.0, 1.0, True)),
        ("cross_entropy_chunk float labels", lambda: ops.cross_entropy_chunk(lg, lab.float(), None, None, 1.0, -100,
                                                                             0.0, 1.0, True)),
        ("cross_entropy_chunk short grad_nll", lambda: ops.cross_entropy_chunk(lg, lab, t(2), None, 1.0, -100, 0.0,
                                                                               1.0, True)),
        ("cross_entropy_chunk int logits", lambda: ops.cross_entropy_chunk(t(3, 10, dtype=torch.int32), lab, None,
                                                                           None, 1.0, -100, 0.0, 1.0, True)),
        ("ce_online_block state shape", lambda: ops.ce_online_block(lg.clone(), lab, 0, t(3, 3), t(3, 6), 0.0, 1.0,
                                                                    0.0)),
        ("ce_online_block acc rows", lambda: ops.ce_online_block(lg.clone(), lab, 0, t(3, 4), t(2, 6), 0.0, 1.0,
                                                                 0.0)),
        ("ce_online_block int32 labels", lambda: ops.ce_online_block(lg.clone(), lab.int(), 0, t(3, 4), t(3, 6),
                                                                     0.0, 1.0, 0.0)),
        ("ce_online_finish dh shape", lambda: ops.ce_online_finish(t(3, 4), t(3, 6), t(10, 6), lab, None, -100,
                                                                   t(3, 5))),
        ("ce_online_finish weight H", lambda: ops.ce_online_finish(t(3, 4), t(3, 6), t(10, 5), lab, None, -100,
                                                                   t(3, 6))),
        ("ce_online_finish short row_scale", lambda: ops.ce_online_finish(t(3, 4), t(3, 6), t(10, 6), lab, t(2),
                                                                          -100, t(3, 6))),
        ("rms_norm_forward weight length", lambda: ops.rms_norm_forward(t(4, 8), t(7), 1e-6, 0.0, True)),
        ("rms_norm_forward 3-d x", lambda: ops.rms_norm_forward(t(2, 4, 8), t(8), 1e-6, 0.0, True)),
        ("rms_norm_forward int x", lambda: ops.rms_norm_forward(t(4, 8, dtype=torch.int32), t(8, dtype=torch.int32),
                                                                1e-6, 0.0, True)),
        ("rms_norm_backward short rstd", lambda: ops.rms_norm_backward(t(4, 8), t(4, 8), t(8), t(3), 0.0, True,
                                                                       True)),
        ("rms_norm_backward dy shape", lambda: ops.rms_norm_backward(t(4, 7), t(4, 8), t(8), t(4), 0.0, True, True)),
        ("rope_ tokens", lambda: ops.rope_(t(5, 2, 16), t(4, 1, 16), t(5, 16), t(5, 16), False)),
        ("rope_ odd rot_dim", lambda: ops.rope_(t(5, 2, 16), t(5, 1, 16), t(5, 15), t(5, 15), False)),
        ("rope_ rot_dim > D", lambda: ops.rope_(t(5, 2, 16), t(5, 1, 16), t(5, 32), t(5, 32), False)),
        ("rope_ cos tokens", lambda: ops.rope_(*rope_args[:2], t(4, 16), t(4, 16), False)),
        ("rope_ q is k", lambda: ops.rope_(rope_args[0], rope_args[0], *rope_args[2:], False)),
        ("rope_ int q", lambda: ops.rope_(t(5, 2, 16, dtype=torch.int32), t(5, 1, 16, dtype=torch.int32),
                                          *rope_args[2:], False)),
        ("rope head_dim", lambda: ops.rope(t(5, 2, 16), t(5, 1, 8), t(5, 8), t(5, 8), False)),
        ("rope last dim strided", lambda: ops.rope(t(5, 16, 2).transpose(1, 2), t(5, 1, 16), *rope_args[2:], False)),
    ]
    if dev.type == "cuda":  # a tensor on the other device
        c += [
            ("blockwise8_quantize code on cpu", lambda: ops.blockwise8_quantize(x, code.cpu(), 64)),
            ("nf4_dequantize absmax on cpu", lambda: ops.nf4_dequantize(packed, absmax.cpu(), [4, 64], 64,
                                                                        torch.float32)),
            ("rope cos on cpu", lambda: ops.rope(*rope_args[:2], rope_args[2].cpu(), rope_args[3], False)),
            ("cross_entropy_chunk labels on cpu", lambda: ops.cross_entropy_chunk(lg, lab.cpu(), None, None, 1.0,
                                                                                  -100, 0.0, 1.0, True)),
            ("glu_forward up on cpu", lambda: ops.glu_forward(t(4, 8), t(4, 8).cpu(), 0)),
            ("rms_norm_forward weight on cpu", lambda: ops.rms_norm_forward(t(4, 8), t(8).cpu(), 1e-6, 0.0, True)),
        ]
    return c


def _child(device):
    """Runs in the subprocess: one JSON line per case, 'start' before the call (the last one names a crash)."""
    import sloth  # noqa: F401  (registers the ops)

    for name, fn in cases(device):
        print(json.dumps({"start": name}), flush=True)
        try:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()  # an illegal access surfaces here
            result = None
        except Exception as e:  # noqa: BLE001
            result = type(e).__name__ + ": " + str(e).splitlines()[0][:200]
        print(json.dumps({"name": name, "raised": result}), flush=True)


@pytest.mark.parametrize("device", DEVICES)
def test_inconsistent_arguments_raise(device):
    code = f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); " \
           f"import test_op_robustness as t; t._child({device!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")]
    started = [d["start"] for d in lines if "start" in d]
    assert r.returncode == 0, (f"the process died (return code {r.returncode}: a signal) in the call "
                               f"{started[-1] if started else '?'!r}\n{r.stderr[-3000:]}")
    done = {d["name"]: d["raised"] for d in lines if "name" in d}
    assert len(done) == len(started) and done
    silent = [n for n, raised in done.items() if raised is None]
    assert not silent, f"these calls returned instead of raising: {silent}"
    # the op's own check (a TORCH_CHECK naming sloth), not an error from somewhere else
    not_checked = {n: e for n, e in done.items() if not (e.startswith("RuntimeError") and "sloth" in e)}
    assert not not_checked, not_checked
