"""bench.py's GPU check, as far as a CPU allows: it refuses without CUDA, and its learning step runs."""

import pytest

import bench


def test_the_gpu_check_refuses_clearly_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--gpu-check needs a CUDA GPU, and this machine has none"):
        bench.gpu_check(str(tmp_path / "gpu-check.json"))
    assert not (tmp_path / "gpu-check.json").exists()


def test_its_learning_step_samples_the_longest_rollouts_and_learns(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "test", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                                   rope_theta=1e6))
    figures = bench.learning_step("test", "cpu", new_tokens=4)
    assert figures["tokens"] == 8 * 8 * 4   # 8 questions x 8 rollouts that never stop
    assert figures["sampling_s"] > 0 and figures["learning_s"] > 0 and figures["peak_gb"] > 0


def test_its_profile_names_where_each_step_spends_and_counts_the_launches(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "test", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                                   rope_theta=1e6))
    import rollout
    monkeypatch.setattr(rollout, "decode_static", lambda *a, real=rollout.decode_static, **k:
                        real(*a, compile=False, **k))   # compiling is the GPU check's to pay; here, its shape
    summary = bench.profile_steps("test", "cpu", new_tokens=4, rows=8)
    assert set(summary) == {"decode_eager_4_steps", "decode_static_4_steps", "learning_step"}
    for name, figures in summary.items():
        assert figures["launches"] > 0 and "aten::" in figures["top"], name
