"""Memory estimates before allocation (training/memory.py)."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src import monitoring as jax_monitoring

from aapt_jax import load_config, parallel
from aapt_jax.training import memory
from aapt_jax.training.program import build_train_program

from helpers import config_path


def _device0_bytes(tree):
  """Bytes of device 0's shards of every array in `tree` (what it really holds)."""
  dev = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == dev)
  return total


def test_estimate_equals_initialised_sharded_state():
  config = load_config(config_path("tiny.py"), {"mesh.data": 1, "mesh.fsdp": 4,
                                                "mesh.tensor": 2})
  mesh = parallel.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  est = memory.state_memory(config, mesh)
  state = build_train_program(config, mesh).init_state()

  assert est.total == _device0_bytes(state)
  assert est.params == _device0_bytes(state.gen_params)
  assert est.optimizer == _device0_bytes(state.gen_opt)
  assert est.ema == _device0_bytes(state.ema_params)
  # Really sharded: device 0 holds less than the whole state, and the same
  # estimate on an abstract mesh (no devices) agrees.
  assert est.total < sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  assert memory.state_memory(config, memory.abstract_mesh(1, 4, 2)) == est


def _compiles_while(fn):
  """(XLA programs compiled while `fn()` ran (JAX's compile-time events), its result)."""
  events = []
  record = lambda name, *_, **__: events.append(name)
  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    result = fn()
  finally:
    jax_monitoring.unregister_event_duration_listener(record)
  return sum(name == "/jax/core/compile/backend_compile_duration" for name in events), result


def test_8b_on_these_devices_raises_with_need_and_alternative(monkeypatch):
  config = load_config(config_path("aapt_8b.py"))
  # the memory per device it compares against, and where that figure comes from
  monkeypatch.setattr(memory, "device_memory",
                      lambda devices=None: (12 * 2**30, "host RAM MemAvailable (test)"))
  live = len(jax.live_arrays())

  def check():
    with pytest.raises(ValueError) as info:
      memory.check_fits(config, config_name="configs/aapt_8b.py")
    return str(info.value)

  compiles, msg = _compiles_while(check)
  assert _compiles_while(lambda: jax.jit(lambda x: x * 3).lower(jnp.ones(3)).compile())[0] >= 1
  # eval_shape only: nothing compiled, nothing allocated
  assert compiles == 0 and len(jax.live_arrays()) == live
  assert "configs/aapt_8b.py needs" in msg
  assert "GiB per device" in msg
  assert "use configs/atari.py" in msg
  assert "80 GiB accelerators (H100), at least " in msg
  assert "each cpu device here has 12.0 GiB (host RAM MemAvailable (test))" in msg
  # The figure it names is at least the real per-device size of the state:
  # ~8.2e9 params x 16 bytes (params, Adam mu/nu, EMA) over the 32-way
  # (fsdp=8 x tensor=4) split of the config's mesh.
  needed = float(msg.split("configs/aapt_8b.py needs ")[1].split(" GiB")[0])
  assert needed * 2**30 > 8e9 * 16 / 32


def test_device_memory_on_cpu_is_the_hosts_share():
  """On CPU (no memory_stats) the figure is /proc/meminfo's, split over the
  local devices, and says so."""
  available, source = memory.device_memory()
  assert available > 0
  assert re.fullmatch(r"host RAM Mem(Available|Total) [0-9.]+ GiB / 8 local cpu devices", source)
  total_gib = float(source.split()[3])
  assert abs(available * 8 / 2**30 - total_gib) < 0.1  # the same reading, split 8 ways


def test_8b_on_one_device_names_the_mesh_problem_and_memory():
  config = load_config(config_path("aapt_8b.py"))
  with pytest.raises(ValueError, match=r"does not divide 1 devices.*GiB per device.*"
                                       r"use configs/atari.py"):
    memory.check_fits(config, devices=jax.devices()[:1], config_name="configs/aapt_8b.py")


def test_8b_defaults_pass_on_256_h100s_and_the_advice_is_the_configs_layout():
  config = load_config(config_path("aapt_8b.py"))
  est = memory.check_fits(config, memory.abstract_mesh(8, 8, 4), memory.H100_BYTES)
  assert est.samples_per_device == 1 and est.needed <= memory.H100_BYTES
  n, best, own = memory.devices_needed(config, memory.H100_BYTES)
  assert own and (best.mesh_shape["fsdp"], best.mesh_shape["tensor"]) == (8, 4)
  assert n <= 256
  # Fewer devices than that cannot fit by the estimate (a lower bound).
  data = n // 2 // 32
  if data:
    with pytest.raises(ValueError, match="GiB per device"):
      memory.check_fits(config, memory.abstract_mesh(data, 8, 4), memory.H100_BYTES)


def test_tiny_and_atari_pass():
  for name in ("tiny.py", "atari.py"):
    est = memory.check_fits(load_config(config_path(name)))
    assert 0 < est.needed <= est.available


def test_device_memory_falls_back_to_host_ram_per_device():
  avail, source = memory.device_memory()
  assert avail > 0
  if jax.devices()[0].platform == "cpu":
    assert "host RAM" in source and f"/ {jax.local_device_count()} local" in source
