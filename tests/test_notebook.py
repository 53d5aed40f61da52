"""Runs notebooks/se_resnet18_cifar10.ipynb top to bottom, offline, on CPU, in its short setting.

How: nbclient runs every cell in a fresh IPython kernel with `SE_RESNET_NOTEBOOK_QUICK=1` (generated
data, a tiny SE-ResNet18; one epoch, with `SE_RESNET_NOTEBOOK_EPOCHS=1`: every cell runs the same
for one as for three) and the notebook's own folder as the working directory, so it
finds the repository's configs/ and installs nothing. JAX sees 8 CPU devices, the shape of an 8-core
TPU, so the data-parallel path the notebook promises on Colab (batch split over all devices, the
sharded forward pass) runs here too. The kernel is ipykernel on *this* interpreter:
the test writes a kernelspec whose argv is `sys.executable` into a temporary folder and puts that
folder first on JUPYTER_PATH, so a `python3` kernelspec of another Python (user-wide or system-wide)
can never be picked up. Needs the `test` extra (nbclient, nbformat, ipykernel, matplotlib); about
a minute on 2 CPU cores.
"""

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
pytest.importorskip('matplotlib')

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'se_resnet18_cifar10.ipynb'
KERNEL_NAME = 'se-resnet-jax-test'
CELL_TIMEOUT_S = 600
DEVICES = 8
MIN_PICTURES = 4  # learning curves, confusion matrix, prediction grid, SE excitations (+ per class)


def _write_kernelspec(root: pathlib.Path) -> pathlib.Path:
  """A Jupyter data dir holding a kernelspec that runs ipykernel on this very interpreter."""
  spec_dir = root / 'kernels' / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
          'display_name': f'Python ({sys.executable})', 'language': 'python'}
  (spec_dir / 'kernel.json').write_text(json.dumps(spec))
  return root


def _pictures(nb) -> list:
  return [out for cell in nb.cells if cell.cell_type == 'code' for out in cell.get('outputs', [])
          if out.get('output_type') in ('display_data', 'execute_result')
          and 'image/png' in out.get('data', {})]


def test_notebook_is_saved_without_outputs():
  """No stale pictures or numbers in the repository's copy; the parameters cell is tagged."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == 'code']
  assert all(not cell.outputs and cell.execution_count is None for cell in code), (
      'Clear the notebook outputs before committing (Edit > Clear all outputs, or '
      '`jupyter nbconvert --clear-output --inplace notebooks/se_resnet18_cifar10.ipynb`).')
  tagged = [cell for cell in code if 'parameters' in cell.metadata.get('tags', [])]
  assert len(tagged) == 1 and 'SE_RESNET_NOTEBOOK_QUICK' in tagged[0].source


@pytest.mark.slow
def test_notebook_runs_offline_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv('JUPYTER_PATH', str(_write_kernelspec(tmp_path / 'jupyter')))
  monkeypatch.setenv('IPYTHONDIR', str(tmp_path / 'ipython'))  # no user startup files or history
  monkeypatch.setenv('SE_RESNET_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('SE_RESNET_NOTEBOOK_EPOCHS', '1')
  monkeypatch.setenv('SE_RESNET_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', f'{os.environ.get("XLA_FLAGS", "")} '
                     f'--xla_force_host_platform_device_count={DEVICES}'.strip())
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  monkeypatch.delenv('MPLBACKEND', raising=False)  # the notebook draws with the inline backend

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, startup_timeout=120,
      resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'A notebook cell failed:\n{e}')
  finally:  # the executed copy, for a look at what went wrong (or right)
    nbformat.write(nb, str(tmp_path / NOTEBOOK.name))

  errors = [out for cell in nb.cells if cell.cell_type == 'code' for out in cell.outputs
            if out.output_type == 'error']
  assert not errors
  pictures = _pictures(nb)
  assert len(pictures) >= MIN_PICTURES, f'only {len(pictures)} pictures in the outputs'
  text = '\n'.join(out.get('text', '') for cell in nb.cells if cell.cell_type == 'code'
                   for out in cell.outputs if out.output_type == 'stream')
  assert 'Short run' in text and 'test accuracy' in text
  assert f'= {DEVICES} device(s)' in text, 'the run did not use every device'
  with open(tmp_path / 'run' / 'report.json') as f:  # the run went to the test's workdir
    assert json.load(f)['epochs_completed'] == 1
