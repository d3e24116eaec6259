"""XLA_FLAGS defaults of the entry points (`xla_env`)."""

import pathlib
import subprocess
import sys

import pytest

from locnet_jax import xla_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("given, expected", [
    ("", xla_env.CHANNELS_LAST_FLAG),
    ("--xla_dump_to=/tmp/x", f"--xla_dump_to=/tmp/x {xla_env.CHANNELS_LAST_FLAG}"),
    ("--xla_gpu_force_conv_nhwc=false", "--xla_gpu_force_conv_nhwc=false"),  # the user's choice stays
    ("--xla_gpu_force_conv_nchw=true --xla_dump_to=/tmp/x", "--xla_gpu_force_conv_nchw=true --xla_dump_to=/tmp/x"),
    ("--xla_gpu_force_conv_nhwc", "--xla_gpu_force_conv_nhwc"),
])
def test_with_channels_last_convolutions(given, expected):
  assert xla_env.with_channels_last_convolutions(given) == expected


def test_prefer_channels_last_convolutions_is_idempotent():
  environ = {"HOME": "/x"}
  xla_env.prefer_channels_last_convolutions(environ)
  xla_env.prefer_channels_last_convolutions(environ)
  assert environ == {"HOME": "/x", "XLA_FLAGS": xla_env.CHANNELS_LAST_FLAG}


def test_flag_set_after_importing_jax_is_read_and_accepted_on_cpu():
  # XLA parses XLA_FLAGS when the backend starts, not when jax is imported: setting the flag in main() after
  # the imports takes effect, and the CPU build knows the GPU option (an unknown flag would abort).
  code = ("import os, jax, jax.numpy as jnp\n"
          "from locnet_jax import xla_env\n"
          "xla_env.prefer_channels_last_convolutions()\n"
          "print(float(jnp.arange(4.0).sum()), os.environ['XLA_FLAGS'])\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
  assert done.returncode == 0, done.stderr[-500:]
  assert done.stdout.split() == ["6.0", xla_env.CHANNELS_LAST_FLAG]
  bogus = code.replace("xla_env.prefer_channels_last_convolutions()", "os.environ['XLA_FLAGS'] = '--xla_no_such_flag=1'")
  done = subprocess.run([sys.executable, "-c", bogus], capture_output=True, text=True,
                        env={"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
  assert done.returncode != 0 and "xla_no_such_flag" in done.stderr  # so the flags really are read late
