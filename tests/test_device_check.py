"""The GPU check (benchmarks/device_check.sh) and its pieces, rehearsed on the CPU.

The device machine gets one try, with no TensorFlow, clu's TensorBoard writers or tfds: `--quick`
runs the same script end to end on generated JPEG data with TensorFlow hidden (a stub package that
fails to import, in every stage), so what breaks there breaks here first.
"""

import io
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import subprocess_env

from benchmarks import causes, cifar_jpeg, time_to_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decoding_gives_each_image_in_the_shuffled_order_of_the_shared_builder(tmp_path):
  from PIL import Image

  source, target = str(tmp_path / 'jpeg.npz'), str(tmp_path / 'arrays.npz')
  cifar_jpeg.synthesize(source, num_train=40, num_test=12)
  assert cifar_jpeg.decode(source, target, workers=2) == {'train': 40, 'test': 12, 'workers': 2}
  z, arrays = np.load(source), np.load(target)
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    assert x.shape == (len(y), 32, 32, 3) and x.dtype == np.uint8
    perm = np.random.RandomState(cifar_jpeg.SHUFFLE_SEEDS[split]).permutation(len(y))
    np.testing.assert_array_equal(y, z[f'{split}_labels'][perm])
    offsets, blob = z[f'{split}_offsets'], z[f'{split}_jpeg']
    for i in (0, len(y) - 1):
      j = perm[i]
      expected = np.asarray(Image.open(io.BytesIO(blob[offsets[j]:offsets[j + 1]].tobytes())))
      np.testing.assert_array_equal(x[i], expected)
  assert list(arrays['classes'])[:2] == ['airplane', 'automobile']


def test_first_reached_reports_the_first_epoch_over_each_line():
  rows = [{'epoch': e, 'train_s': e * 1.0, 'train_plus_compile_s': e + 20.0, 'wall_s': e + 30.0,
           'val_accuracy': acc} for e, acc in ((1, 0.5), (2, 0.93), (3, 0.92), (4, 0.951))]
  reached = time_to_accuracy.first_reached(rows, 'val_accuracy', (0.90, 0.93, 0.95, 0.96))
  assert [None if v is None else v['epoch'] for v in reached.values()] == [2, 2, 4, None]
  assert reached['0.95'] == {'epoch': 4, 'train_s': 4.0, 'train_plus_compile_s': 24.0,
                             'wall_s': 34.0}


def test_causes_table_pairs_seeds_and_combines_what_beat_the_baseline_on_validation():
  def run(test, val):
    return {'test': test, 'validation': val}

  results = {('baseline', 0): run(0.880, 0.890), ('baseline', 1): run(0.884, 0.886),
             ('decay_all', 0): run(0.890, 0.893), ('decay_all', 1): run(0.886, 0.889),
             ('warmup', 0): run(0.870, 0.880), ('warmup', 1): {'status': 'not run (time)'},
             ('torch_init', 0): run(0.900, 0.885)}
  rows = causes.table_rows(results, ['baseline', 'decay_all', 'warmup', 'torch_init'], [0, 1])
  by_name = {r['variant']: r for r in rows}
  assert by_name['baseline']['test_delta'] is None
  assert by_name['decay_all']['test_delta'] == pytest.approx(0.006)  # (0.010 + 0.002) / 2
  assert by_name['decay_all']['val_delta'] == pytest.approx(0.003)
  assert by_name['warmup']['val_pairs'] == 1 and by_name['warmup']['val_mean'] == 0.880
  assert by_name['torch_init']['test_delta'] == pytest.approx(0.020)
  # chosen on validation: torch_init's better test accuracy does not count
  assert causes.choose_combination(rows) == ['decay_all']
  assert causes.choose_combination(
      [r for r in rows if r['variant'] != 'decay_all']) == ['torch_init']  # the least bad one
  assert causes.choose_combination(rows[:1]) == []
  table = causes.markdown({'epochs': 30, 'seeds': [0, 1], 'rows': rows, 'config_args': [],
                           'long': {'variants': ['decay_all'], 'epochs': 100, 'seed': 0,
                                    'test': 0.93, 'validation': 0.94}})
  assert table.count('\n| `') == 4 and 'not run (time)' in table and '+0.60' in table
  config = causes.run_config(time_to_accuracy.ml_collections.ConfigDict(
      {'num_epochs': 30, 'seed': 0, 'weight_decay_mask': 'kernels', 'eval_every_epochs': 1,
       'checkpoint_every_epochs': 1, 'measure_inference': True, 'keep_checkpoints': 3}),
      causes.variant_changes('decay_all', 5.0), seed=1, num_epochs=100)
  assert (config.weight_decay_mask, config.seed, config.num_epochs, config.eval_every_epochs,
          config.checkpoint_every_epochs) == ('all', 1, 100, 100, 100)


def test_causes_runs_seed_by_seed_then_the_combination_and_respects_its_budget(
    make_tiny_config, tmp_path, monkeypatch):
  """run_causes' plan with stand-in runs: what trains when, in which config, and the table."""
  trained = []

  def fake_run(config, run_dir):
    trained.append((os.path.relpath(run_dir, tmp_path), config))
    val = (0.80 + 0.01 * (config.weight_decay_mask == 'all')
           - 0.02 * (config.model.kernel_init == 'torch_default') + 0.001 * config.seed)
    return {'run_dir': run_dir, 'epochs_completed': config.num_epochs,
            'validation': {'accuracy': val, 'loss': 1.0}, 'test': {'accuracy': val, 'loss': 1.0}}

  monkeypatch.setattr(causes.common, 'run', fake_run)
  config = make_tiny_config(num_epochs=4, warmup_epochs=1.0)
  summary = causes.run_causes(config, str(tmp_path / 'out'), str(tmp_path / 'runs'),
                              ['decay_all', 'torch_init'], seeds=2, long_epochs=6,
                              warmup_epochs=2.0, cache_dir=str(tmp_path / 'cache'))
  assert [name for name, _ in trained] == [
      'runs/baseline/seed_0', 'runs/decay_all/seed_0', 'runs/torch_init/seed_0',
      'runs/baseline/seed_1', 'runs/decay_all/seed_1', 'runs/torch_init/seed_1',
      'runs/combination/seed_0']
  long = trained[-1][1]
  assert (long.num_epochs, long.weight_decay_mask, long.model.kernel_init, long.seed,
          long.eval_every_epochs) == (6, 'all', 'lecun_normal', 0, 6)
  assert all(c.num_epochs == 4 and c.checkpoint_every_epochs == 4 for _, c in trained[:-1])
  rows = {r['variant']: r for r in summary['rows']}
  assert rows['decay_all']['val_delta'] == pytest.approx(0.01)
  assert rows['torch_init']['val_delta'] == pytest.approx(-0.02)
  assert summary['long']['variants'] == ['decay_all'] and summary['long']['test'] > 0.8
  saved = json.loads((tmp_path / 'out' / 'causes.json').read_text())
  assert saved['long']['epochs'] == 6 and len(saved['rows']) == 3
  assert (tmp_path / 'out' / 'causes.md').read_text().count('| `') == 3

  trained.clear()  # no time for more than the first run: the others get rows saying so
  summary = causes.run_causes(config, str(tmp_path / 'out2'), str(tmp_path / 'runs2'),
                              ['decay_all'], seeds=1, long_epochs=6, warmup_epochs=2.0,
                              time_budget_s=0.0,
                              cache_dir=str(tmp_path / 'cache'))
  assert len(trained) == 1
  assert summary['rows'][1]['runs'][0]['status'] == 'not run (time)'
  assert summary['long'] is None  # no variant finished: nothing to combine


@pytest.mark.slow
def test_quick_device_check_runs_every_stage_and_keeps_every_table(tmp_path):
  out_dir, work = tmp_path / 'out', tmp_path / 'work'
  env = subprocess_env(OUT=str(out_dir), WORK=str(work), PYTHONPATH=REPO)
  proc = subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'device_check.sh'), '--quick'],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)
  log = (out_dir / 'device_check.log').read_text()
  assert proc.returncode == 0, log + proc.stderr[-2000:]
  for stage in ('twin', 'causes', 'fast', 'bench'):
    assert f'{stage}: rc=0' in log, log
  assert 'library imports without TensorFlow' in (out_dir / 'no_tensorflow.txt').read_text()

  twin = json.loads((out_dir / 'twin' / 'twin.json').read_text())
  assert [(r['framework'], r['status'], r['epochs']) for r in twin['rows']] == [
      ('jax', 'ok', 2), ('pytorch', 'ok', 2)]
  assert all(0 <= r['test_accuracy'] <= 1 for r in twin['rows'])
  assert (out_dir / 'twin' / 'jax' / 'report.json').exists()
  assert not (out_dir / 'twin' / 'jax' / 'checkpoints').exists()  # checkpoints stay in WORK
  run = work / 'twin' / 'jax'
  assert (run / 'checkpoints').is_dir()
  assert not list(run.glob('events.out.tfevents*'))  # TensorFlow was hidden: no TensorBoard file

  table = json.loads((out_dir / 'causes' / 'causes.json').read_text())
  assert [r['variant'] for r in table['rows']] == ['baseline', 'torch_init']
  assert all(0 <= r['test_mean'] <= 1 for r in table['rows'])
  assert table['rows'][1]['test_delta'] is not None
  assert table['long'] is None  # the combination's run is left to the GPU (CAUSES_LONG_EPOCHS)
  assert (out_dir / 'causes' / 'causes.md').exists()

  fast = json.loads((out_dir / 'fast' / 'time_to_accuracy.json').read_text())
  assert fast['epochs_completed'] == 1 and fast['epochs'][0]['test_accuracy_side'] is not None
  assert fast['config']['tta_flip'] and fast['config']['batch_size'] == 32
  assert len((out_dir / 'fast' / 'epochs.jsonl').read_text().splitlines()) == 1

  events = [json.loads(line)['event']
            for line in (out_dir / 'bench' / 'benchmark.jsonl').read_text().splitlines()]
  assert events[0] == 'environment' and 'round' in events and events[-1] == 'row'
  summary = (out_dir / 'summary.md').read_text()
  assert '| jax |' in summary and '| pytorch |' in summary and 'JAX train img/s' in summary
  assert '| `torch_init` |' in summary
