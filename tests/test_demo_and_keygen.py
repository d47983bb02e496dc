"""The two commands a new user runs first: keygen and demo. And the README's install, literally."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from kombu_envelope.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_keygen_writes_an_owner_only_key_and_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "dev.key"
    assert main(["keygen", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = path.read_bytes()
    assert f"KOMBU_ENVELOPE_KEY_URI=local://{path}" in capsys.readouterr().out

    assert main(["keygen", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == first


def test_two_keygens_make_different_keys(tmp_path):
    main(["keygen", str(tmp_path / "a")])
    main(["keygen", str(tmp_path / "b")])
    assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()


def test_a_key_file_readable_by_others_is_refused(tmp_path):
    from kombu_envelope.codec import EnvelopeCodec
    from kombu_envelope.errors import ConfigurationError

    path = tmp_path / "k"
    main(["keygen", str(path)])
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="readable by others; run: chmod 600"):
        EnvelopeCodec([f"local://{path}"]).encode("x")


def test_demo_shows_only_ciphertext_in_the_broker_and_decrypted_results():
    result = subprocess.run(
        [sys.executable, "-m", "kombu_envelope", "demo"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    broker_part, worker_part = out.split("4. A worker")
    assert "Card number readable anywhere in the queued messages: no" in broker_part
    # The secret is shown once in the explanation line, and nowhere in the raw message dump.
    raw_dump = broker_part.split("3. The first message as the broker holds it:")[1]
    assert "4111" not in raw_dump
    assert "'<encrypted>'" in raw_dump
    assert len(re.findall(r"charged \d+\.\d\d to \w+'s card 4111-1111-1111-1111", worker_part)) == 3


@pytest.mark.slow
def test_readme_install_and_demo_work_in_a_fresh_venv(tmp_path):
    """The README's first two commands, copied literally, in a new virtual environment."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\$ (.+)$", readme.split("Run the tests")[0], flags=re.M)
    assert commands == ["pip install .", "kombu-envelope demo"]
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    environ = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(env_dir))
    environ.pop("PYTHONPATH", None)
    for command in commands:
        result = subprocess.run(
            command, shell=True, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Card number readable anywhere in the queued messages: no" in result.stdout
