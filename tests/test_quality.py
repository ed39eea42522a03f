"""inference/quality.py: PSNR and SSIM against hand-computed values, and the
noise/frozen statistics telling those failures from a real video."""
import numpy as np
import pytest

from aapt_jax.inference.quality import VideoQuality, change, psnr, roughness, ssim


def test_psnr_by_hand():
  a = np.zeros((4, 4, 3), np.uint8)
  b = a.copy()
  b[0, 0, 0] = 48  # MSE = 48^2 / 48 = 48
  assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / 48))
  assert psnr(a, a) == float("inf")


def test_ssim_of_constant_frames_is_the_luminance_term():
  """Constant frames have no variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
  a, b = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 140, np.uint8)
  c1 = (0.01 * 255) ** 2
  assert ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1))


def test_ssim_is_one_for_equal_frames_and_drops_with_noise_and_inversion():
  rng = np.random.default_rng(0)
  x = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
  assert ssim(x, x) == pytest.approx(1.0)
  noisy = np.clip(x + rng.normal(0, 40, x.shape), 0, 255).astype(np.uint8)
  noisier = np.clip(x + rng.normal(0, 80, x.shape), 0, 255).astype(np.uint8)
  assert 1.0 > ssim(x, noisy) > ssim(x, noisier)
  assert ssim(x, 255 - x) < 0  # anti-correlated structure
  with pytest.raises(ValueError, match="shape"):
    ssim(x, x[:16])


def test_noise_and_frozen_statistics():
  frame = np.zeros((8, 8, 3), np.uint8)
  frame[:, 4:] = 200  # one vertical edge
  # horizontal neighbours differ at 1 of 7 columns, vertical ones never
  assert roughness(frame) == pytest.approx((0 + 200 / 7) / 2)
  assert change(frame, frame) == 0
  assert change(frame, np.zeros_like(frame)) == pytest.approx(100)


def test_video_quality_splits_horizons_and_skips_the_start_frame():
  rng = np.random.default_rng(1)
  real = [(rng.random((8, 8, 3)) * 255).astype(np.uint8) for _ in range(6)]
  generated = [real[0], real[1], real[2], real[3] // 2, real[4] // 2, real[5] // 2]
  q = VideoQuality(split=3)
  for g, r in zip(generated, real):
    q.add(g, r)
  s = q.summary()
  assert s["psnr_early"] == 100.0 and s["ssim_early"] == pytest.approx(1.0)  # frames 1, 2 exact
  assert s["psnr_late"] == pytest.approx(np.mean([psnr(g, r) for g, r in
                                                  zip(generated[3:], real[3:])]), abs=1e-3)
  assert s["real_change"] == pytest.approx(
      np.mean([change(b, a) for a, b in zip(real, real[1:])]), abs=1e-3)
