"""gpu_check.py, as far as a CPU allows: the GPU check refuses without CUDA, its learning step runs and learns on
distinct answers, its profile names where each step spends."""

import pytest

import gpu_check


def test_the_gpu_check_refuses_clearly_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="the GPU check needs a CUDA GPU, and this machine has none"):
        gpu_check.gpu_check(str(tmp_path / "gpu-check.json"))
    assert not (tmp_path / "gpu-check.json").exists()


def test_its_learning_step_samples_the_longest_rollouts_and_learns(monkeypatch):
    monkeypatch.setitem(gpu_check.SHAPES, "test", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                                   rope_theta=1e6))
    figures = gpu_check.learning_step("test", "cpu", new_tokens=4)
    assert figures["tokens"] == 8 * 8 * 4   # 8 questions x 8 rollouts that never stop
    assert figures["sampling_s"] > 0 and figures["learning_s"] > 0 and figures["peak_gb"] > 0


def test_its_profile_names_where_each_step_spends_and_counts_the_launches(monkeypatch):
    monkeypatch.setitem(gpu_check.SHAPES, "test", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                                   rope_theta=1e6))
    import rollout
    monkeypatch.setattr(rollout, "decode_static", lambda *a, real=rollout.decode_static, **k:
                        real(*a, compile=False, **k))   # compiling is the GPU check's to pay; here, its shape
    summary = gpu_check.profile_steps("test", "cpu", new_tokens=4, rows=8)
    assert set(summary) == {"decode_eager_4_steps", "decode_static_4_steps", "learning_step"}
    for name, figures in summary.items():
        assert figures["launches"] > 0 and "aten::" in figures["top"], name
