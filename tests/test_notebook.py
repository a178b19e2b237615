"""The Colab notebook runs top to bottom on the CPU (its small run), in this environment's kernel."""

import os
import pathlib
import sys

import pytest

pytestmark = pytest.mark.slow

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')
pytest.importorskip('ipykernel')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / 'notebooks' / 'ffkd_colab_tpu.ipynb'


def _text(cell) -> str:
  return ''.join(output.get('text', '') for output in cell.get('outputs', []))


def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
  # The kernel inherits this environment: the small run, the 4 emulated CPU devices of
  # conftest.py, cheap compiles, and a workdir the test owns.
  monkeypatch.setenv('FFKD_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('FFKD_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  monkeypatch.delenv('FFKD_TEACHER_CHECKPOINT', raising=False)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # kernel 'python3' with argv[0] 'python' starts as sys.executable (jupyter_client), i.e. the
  # interpreter running the tests; the notebook prints sys.prefix, checked below.
  client = nbclient.NotebookClient(
      notebook, kernel_name='python3', timeout=600, resources={'metadata': {'path': str(REPO_ROOT)}}
  )
  try:
    client.execute()  # raises CellExecutionError naming the cell when one fails
  finally:
    nbformat.write(notebook, tmp_path / 'executed.ipynb')  # to read after a failure

  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  install, devices = _text(code[0]), _text(code[1])
  assert f'ffkd_jax: {REPO_ROOT}' in install, install  # the checkout, nothing installed
  assert f'sys.prefix: {sys.prefix}' in devices, devices
  assert 'backend: cpu' in devices
  images = [
      output
      for cell in code
      for output in cell.get('outputs', [])
      if 'image/png' in output.get('data', {})
  ]
  assert len(images) >= 4, 'expected the accuracy curves and three CKA pictures'
  workdir = tmp_path / 'workdir'
  assert sorted(os.listdir(workdir / 'ffkd' / 'cka'))[0].startswith('cka_matrix_step')
  assert (workdir / 'cka_report' / 'cka_matrix.png').is_file()
