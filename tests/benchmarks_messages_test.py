"""One clear message per data problem, from the command line (offline).

``python -m benchmarks.compare`` runs ``compare.cli``: a data problem ends it
with exit status 2 and one message on stderr saying what to install or run;
no traceback, no chained exception and no tfds/absl warning before it.
Nothing here can download: the ``tfds`` fixture makes any attempt fail.
"""

import logging
import sys

import pytest

from benchmarks import compare


def _fail(argv, capsys, caplog):
  """Runs the CLI, expecting a data error; returns its stderr."""
  caplog.set_level(logging.DEBUG, logger="absl")
  with pytest.raises(SystemExit) as info:
    compare.cli(argv + ["--tiny", "--out", "", "--no-progress"])
  assert info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""  # the error comes before any output.
  err = captured.err
  assert err.startswith("error: ") and err.count("error: ") == 1
  for noise in ("Traceback", "During handling", "direct cause",
                "WARNING", "KeyError", "NotImplementedError"):
    assert noise not in err, noise
  assert [r for r in caplog.records if r.name.startswith("absl")] == []
  return err


def test_missing_data_dir(tfds, tmp_path, capsys, caplog):
  missing = tmp_path / "nowhere"
  err = _fail(["--dataset", "cifar10", "--data-dir", str(missing)], capsys,
              caplog)
  assert f"The data directory {missing} (--data-dir) does not exist" in err
  assert "tfds build cifar10 --file_format=array_record" in err
  assert not missing.exists()


def test_missing_default_data_dir(tfds, tmp_path, capsys, caplog,
                                  monkeypatch):
  # Without --data-dir tfds raised a raw "KeyError: splits is empty".
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "absent"))
  err = _fail(["--dataset", "mnist"], capsys, caplog)
  assert "($TFDS_DATA_DIR) does not exist" in err
  assert "tfds build mnist --file_format=array_record" in err


def test_missing_prepared_split(tfds, tmp_path, capsys, caplog):
  version = tmp_path / "cifar10" / "3.0.2"
  version.mkdir(parents=True)
  (version / "cifar10-train.array_record-00000-of-00001").write_bytes(b"")
  err = _fail(["--dataset", "cifar10", "--data-dir", str(tmp_path)], capsys,
              caplog)
  assert "The 'test' split of dataset 'cifar10' is not prepared in" in err
  assert "tfds build cifar10 --file_format=array_record" in err


def test_tfrecord_data_must_be_rebuilt(tfds, tmp_path, capsys, caplog):
  version = tmp_path / "mnist" / "3.0.1"
  version.mkdir(parents=True)
  for split in ("train", "test"):
    (version / f"mnist-{split}.tfrecord-00000-of-00001").write_bytes(b"")
  err = _fail(["--dataset", "mnist", "--data-dir", str(tmp_path)], capsys,
              caplog)
  assert "prepared as TFRecord" in err
  assert "--file_format=array_record" in err


def test_tensorflow_datasets_not_installed(tmp_path, capsys, caplog,
                                           monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  err = _fail(["--dataset", "cifar100", "--data-dir", str(tmp_path)], capsys,
              caplog)
  assert "tensorflow-datasets, which is not installed" in err
  assert "pip install tensorflow-datasets" in err
  assert "digits, needs only scikit-learn" in err
