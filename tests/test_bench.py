"""The benchmark CLI produces its table, CSV and plot on CPU (no timing assertions: the machines are
shared), and the FLOP and byte counts behind its TFLOP/s and GB/s columns match brute force."""

import csv
import re
from pathlib import Path

import pytest
import torch

import nsa_ext
from nsa_ext import bench


def test_quick_run_prints_the_table_and_writes_csv(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    assert bench.main(["--quick", "--device", "cpu", "--csv", str(path), "--plot", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["op", "T"])
    table = [line.split() for line in lines[header + 2:] if line.strip() and not line.startswith(("wrote", "matplot"))]
    ops = [o for o in bench.WORKLOADS if bench.has_kernels(o, "cpu")]
    expected = {(op, t, mode) for op in ops for t in ("512", "1024") for mode in ("fwd", "fwd+bwd")
                if mode in bench.WORKLOADS[op].modes}
    assert {(r[0], r[1], r[5]) for r in table} == expected
    for r in table:
        assert float(r[6]) > 0 and float(r[7]) > 0 and r[8].endswith("x")  # ms, sdpa ms, speedup
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected)
    assert all(float(r["seconds"]) > 0 and float(r["speedup_sdpa"]) > 0 for r in rows)
    decode = [r for r in rows if r["op"] == "decode"]
    assert decode and all(float(r["gbps"]) > 0 and float(r["speedup_copy"]) > 0 for r in decode)
    assert ("wrote" in out) or ("matplotlib not installed" in out)


def test_profile_lists_the_largest_entries_of_each_row(capsys):
    assert bench.main(["--quick", "--device", "cpu", "--ops", "window,decode", "--seqlens", "512",
                       "--modes", "fwd", "--profile", "3"]) == 0
    blocks = capsys.readouterr().out.split("profile of one run: ")[1:]
    assert [b.split()[:2] for b in blocks] == [["window", "fwd"], ["decode", "fwd"]]
    for block, op in zip(blocks, ["nsa::sliding_window_attention_fwd", "nsa::decode_attention"]):
        entries = [line.split() for line in block.strip().splitlines()[2:]]
        assert 1 <= len(entries) <= 3
        shares = [float(e[0].rstrip("%")) for e in entries]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.05
        assert op in [e[3] for e in entries]  # the op's own kernel is among the largest


def test_kernel_names_lose_return_type_and_parameters():
    name = "void nsa::decode::decode_attend_kernel<nsa::decode::MmaMath<__nv_bfloat16, 192, 128> >(nsa::DecodeParams, int)"
    assert bench._kernel_name(name) == "nsa::decode::decode_attend_kernel<nsa::decode::MmaMath<__nv_bfloat16, 192, 128> >"
    assert bench._kernel_name("aten::mm") == "aten::mm"
    assert bench._kernel_name("x" * 200, width=20) == "x" * 17 + "..."


def test_bad_arguments_are_reported():
    with pytest.raises(SystemExit):
        bench.main(["--ops", "nonsense"])
    with pytest.raises(SystemExit):
        bench.main(["--groups", "3"])  # does not divide 16 query heads
    with pytest.raises(SystemExit):
        bench.main(["--profile", "-1"])


def test_gpu_check_benchmark_commands_parse():
    """scripts/gpu_check.sh runs on a lent GPU with minutes to spare: a misspelt option there would
    cost a step that cannot be rerun."""
    script = (Path(__file__).parents[1] / "scripts" / "gpu_check.sh").read_text()
    commands = re.findall(r'"\$python" -m nsa_ext\.bench((?:\\\n|[^\n])*)', script)
    assert len(commands) >= 4
    for command in commands:
        text = command.replace("\\\n", " ")
        text = re.sub(r"\$\(\((.*?)\)\)", "8", text)  # $((4 * g)): any number of heads
        args = [a.strip('"') for a in text.split()]
        # Loop variables: $schedule takes a --selection-schedule choice, the others ($g, ...) a number.
        args = [a if not a.startswith("$") else "blocks" if a == "$schedule" else "1" for a in args]
        parsed = bench.build_parser().parse_args(args)
        assert parsed.device == "cuda"


def _case(seqlen, **config):
    return bench.Case(seqlen, 8, 2, 16, 8, torch.float32, "cpu", nsa_ext.NSAConfig(**config))


def test_flop_counts_match_the_masks():
    case = _case(300, compress_block=16, compress_stride=8, select_block=32, select_count=4, window=40)
    positions = torch.arange(case.seqlen)
    assert bench.window_keys(case, positions).tolist() == [min(t + 1, 40) for t in range(300)]
    assert bench.compressed_keys(case, positions).tolist() == [
        sum(1 for i in range(case.compressed_tokens) if i * 8 + 16 - 1 <= t) for t in range(300)]
    gen = torch.Generator().manual_seed(0)
    indices = bench._case_indices(case, gen)[0]
    seen = bench.selected_keys(case, indices, positions)
    for t in (0, 31, 32, 150, 299):
        for h in range(case.heads_k):
            blocks = {j for j in indices[t, h].tolist() if j >= 0}
            assert seen[t, h] == sum(1 for s in range(t + 1) if s // 32 in blocks)
    # 2 (Dk + Dv) FLOPs per query head and visible key
    assert bench._attention_flops(case, torch.tensor([3, 4])) == 2 * 24 * 8 * 7
    assert bench._attention_flops(case, torch.tensor([[3, 4]])) == 2 * 24 * 4 * 7


def test_decode_bytes_count_the_union_of_window_and_blocks():
    case = _case(256, compress_block=16, compress_stride=8, select_block=32, select_count=3, window=40)
    indices = torch.tensor([[[[0, 6, 7], [-1, 2, 7]]]], dtype=torch.int32)  # [B=1, 1, Hk=2, n=3]
    # t = 255: window keys 216..255; head 0 adds blocks 0 (32 keys) and 6 (192..223: 24 new); block 7 is
    # inside the window. Head 1 adds block 2 (32 keys).
    rows = (40 + 32 + 24) + (40 + 32) + 2 * case.compressed_tokens
    assert bench.decode_read_bytes(case, indices) == rows * (16 + 8) * 4
