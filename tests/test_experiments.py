"""The experiment commands (ablation, search, k-fold) on a tiny SE-ResNet18 and generated images.

Two tests train for real, sharing one persistent compilation cache: early stopping, and the
ablation whose later seeds must load every program from that cache. Everything else (which run is
chosen, what an interrupted experiment redoes, which configs the variants get, the tables and the
command line) is checked with a fake trainer, passed as `trainer=`, that writes report.json the way
train_and_evaluate does.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from conftest import REPO, TINY_RUN
from flax import traverse_util
from ml_collections import config_flags

from se_resnet_jax import files, input_pipeline
from se_resnet_jax.config import ConfigError, base_config, load_config_file
from se_resnet_jax.errors import Preempted
from se_resnet_jax.experiments import ablation, common, kfold, search

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# The session run's sizes and schedule (conftest.TINY_RUN), so that the real runs here load its
# programs from the cache, and configs/smoke.py's recipe, which that run trains with: the runs here
# start from base_config().
TINY = {
    **{k: v for k, v in TINY_RUN.items() if k not in ('dataset', 'tensorboard')},
    'dataset': 'synthetic', 'model.dropout_rate': 0.1, 'learning_rate': 0.05,
    'warmup_epochs': 0.5, 'log_every_steps': 1000,
}


def tiny_config(**values):
  """SE-ResNet18 at base width 4 (r=2) on 256 generated training images: 8 steps an epoch."""
  return common.with_values(base_config(), {**TINY, **values})


@pytest.fixture(scope='module')
def cache_dir():
  """The session's compilation cache (conftest.py), where the session run left its programs."""
  return jax.config.jax_compilation_cache_dir


def assert_png(path):
  import matplotlib.image

  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  height, width = matplotlib.image.imread(path).shape[:2]
  assert width >= 200 and height >= 150


def table_rows(markdown_path, first_cell):
  with open(markdown_path) as f:
    return [line for line in f if line.startswith(f'| {first_cell}')]


class Killed(Exception):
  """What the fake trainer raises to stand for a process killed mid-run."""


class FakeTrainer:
  """A common.Trainer that records its calls and writes config.json then report.json.

  `metrics(config)` gives (validation accuracy, test accuracy); losses are 1 - accuracy. With
  `kill_on_call=n` the n-th call writes config.json and then dies, as a killed run would.
  """

  def __init__(self, metrics, kill_on_call=None):
    self.metrics, self.kill_on_call, self.calls = metrics, kill_on_call, []

  def __call__(self, config, workdir):
    self.calls.append((config, workdir))
    os.makedirs(workdir, exist_ok=True)
    files.write_json_atomic(os.path.join(workdir, 'config.json'), config.to_dict())
    if len(self.calls) == self.kill_on_call:
      raise Killed(workdir)
    val, test = self.metrics(config)
    result = {'config': config.to_dict(), 'class_names': [f'class_{i}' for i in range(10)],
              'epochs_completed': config.num_epochs, 'best_epoch': config.num_epochs,
              'validation': {'accuracy': val, 'loss': 1 - val}}
    if config.evaluate_test:
      result['test'] = {'accuracy': test, 'loss': 1 - test}
    files.write_json_atomic(os.path.join(workdir, 'report.json'), result)
    return result

  @property
  def workdirs(self):
    return [w for _, w in self.calls]


# Real training.


def test_early_stopping_stops_and_records_the_epoch(tmp_path, cache_dir):
  # min_delta 1.0: validation accuracy would have to rise by more than 100 points to count as an
  # improvement, so after the first evaluation nothing improves and patience 1 stops at epoch 2.
  config = tiny_config(**{'early_stopping.enabled': True, 'early_stopping.patience': 1,
                          'early_stopping.min_delta': 1.0})
  with common.compilation_cache(cache_dir):
    summary = common.run(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'report.json') as f:
    saved = json.load(f)
  stop = saved['early_stopping']
  assert (stop['stopped_epoch'], stop['monitor']) == (2, 'val_accuracy')
  assert stop['best_value'] == saved['history'][0]['val_accuracy']
  assert saved['epochs_completed'] == 2 < config.num_epochs
  assert [row['epoch'] for row in saved['history']] == [1, 2]
  assert summary['stopped_epoch'] == 2 and summary['trained_now']


def test_ablation_tables_picture_parameters_and_compilation_cache(tmp_path, cache_dir):
  workdir = str(tmp_path / 'ablation')
  result = ablation.run_ablation(tiny_config(), workdir, seeds=2, variants=['full', 'no_dropout'],
                                 cache_dir=cache_dir)

  variants = {v['name']: v for v in result['variants']}
  assert list(variants) == ['full', 'no_dropout'] and result['seeds'] == [0, 1]
  assert result['split'] == 'test'
  for v in variants.values():
    assert [r['seed'] for r in v['runs']] == [0, 1]
    assert v['accuracy']['n'] == 2 and 0.0 <= v['accuracy']['mean'] <= 1.0
    # The second seed compiles nothing: every program comes from the first seed's cache entries.
    second = v['runs'][1]['compile_cache']
    assert second['hits'] >= 2 and second['misses'] == 0, (v['name'], second)
  assert variants['full']['accuracy_delta'] == {'mean': 0.0, 'std': 0.0, 'n': 2}
  paired = [r['test']['accuracy'] - f['test']['accuracy']
            for r, f in zip(variants['no_dropout']['runs'], variants['full']['runs'])]
  assert variants['no_dropout']['accuracy_delta'] == pytest.approx(common.mean_std(paired))
  assert variants['no_dropout']['parameters'] == variants['full']['parameters'] > 0

  # Same data, same seeds: the variants' configs differ from the full model's only where meant.
  def config_of(variant, seed):
    with open(os.path.join(workdir, variant, f'seed_{seed}', 'config.json')) as f:
      return traverse_util.flatten_dict(json.load(f), sep='.')

  full = config_of('full', 1)
  assert {k for k, x in config_of('no_dropout', 1).items() if full[k] != x} == {
      'model.dropout_rate'}
  assert {k for k, x in config_of('full', 0).items() if full[k] != x} == {'seed'}

  for name in variants:  # a summary row, then one row per seed
    summary, *per_seed = table_rows(os.path.join(workdir, 'ablation.md'), f'`{name}` |')
    assert summary.count(' ± ') == (3 if name == 'full' else 5) and len(per_seed) == 2
  assert_png(os.path.join(workdir, 'ablation.png'))


# No training.


def test_paired_interval_numbers():
  """Student's t on paired differences: df = n - 1, none for one seed."""
  three = common.paired_interval([0.01, 0.02, 0.06])
  half = 4.302652730 * np.std([0.01, 0.02, 0.06], ddof=1) / np.sqrt(3)
  assert (three['df'], three['low'], three['high']) == pytest.approx((2, 0.03 - half, 0.03 + half))
  one = common.paired_interval([0.5])
  assert (one['low'], one['high'], one['df']) == (None, None, 0)


def test_kfold_runs_validate_on_complementary_folds():
  data = [input_pipeline.load_dataset(kfold.fold_config(tiny_config(), 2, 0.1, 2, fold))
          for fold in (0, 1)]
  assert [len(d.validation) for d in data] == [192, 192]
  images = lambda split: {image.tobytes() for image in split.images}
  assert images(data[0].validation) == images(data[1].train)  # k=2: each fold trains the other
  assert not kfold.fold_config(tiny_config(), 2, 0.1, 2, 0).evaluate_test


def test_parameter_count_of_the_reference_model():
  assert common.count_parameters(base_config(), 10) == 11_263_042
  assert common.count_parameters(ablation.variant_config(base_config(), 'no_se'), 10) == 11_173_962


def write_config_file(path, values):
  path.write_text('from se_resnet_jax.config import base_config\n\n\ndef get_config():\n'
                  '  config = base_config()\n'
                  f'  config.update_from_flattened_dict({values!r})\n  return config\n')
  return str(path)


@pytest.mark.slow
def test_search_command_writes_tables_heat_map_and_a_config_that_reruns(tmp_path):
  # The runs are finished beforehand by the fake trainer, so the command reads them back: the
  # command line, the tables and chosen_config.py are checked without training.
  workdir = tmp_path / 'search'
  search.run_search(tiny_config(), str(workdir), reductions=[2], dropouts=[0.0, 0.1],
                    trainer=FakeTrainer(lambda c: (0.6 + c.model.dropout_rate, 0.5)))
  config_file = write_config_file(tmp_path / 'tiny.py', {**TINY, 'num_epochs': 7})
  command = [sys.executable, '-m', 'se_resnet_jax.experiments.search', f'--config={config_file}',
             f'--config.num_epochs={TINY["num_epochs"]}', f'--workdir={workdir}', '--reductions=2',
             '--dropouts=0.0,0.1']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  with open(workdir / 'search.json') as f:
    result = json.load(f)
  assert [(r['reduction'], r['dropout']) for r in result['runs']] == [(2, 0.0), (2, 0.1)]
  assert not any(r['trained_now'] for r in result['runs'])
  assert all('test' not in r for r in result['runs'])  # the search never evaluates the test set
  chosen = result['chosen']
  assert (chosen['model.se_reduction'], chosen['model.dropout_rate']) == (2, 0.1)
  (heat_map_row,) = table_rows(workdir / 'search.md', '**')  # r = 2 by dropout 0 and 0.1
  assert heat_map_row.count('|') == 4
  assert_png(workdir / 'search.png')

  # chosen_config.py loads through the flag the commands use: the search's config file, its
  # --config.num_epochs override and the chosen values.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values)
  flag_values(['prog', f'--config={result["chosen_config"]}'])
  expected = common.with_values(tiny_config(), {'model.dropout_rate': 0.1})
  assert flag_values.config.to_dict() == expected.to_dict()
  # The command ends by pointing at the table; chosen_config.py and search.md name the same
  # command to train the chosen settings.
  assert str(workdir / 'search.md') in done.stdout, done.stdout
  with open(result['chosen_config']) as f:
    assert result['commands']['train_chosen'] in f.read()
  assert result['commands']['train_chosen'] in (workdir / 'search.md').read_text()


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
  config_file = write_config_file(tmp_path / 'tiny.py', TINY)
  done = subprocess.run(
      [sys.executable, '-m', 'se_resnet_jax.experiments.kfold', f'--config={config_file}',
       f'--workdir={tmp_path / "kfold"}', '--settings=2-0.1'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'Traceback' not in done.stderr
  assert not os.path.exists(tmp_path / 'kfold')


def test_search_choice_follows_validation_even_when_test_disagrees(tmp_path):
  # Validation prefers large r and low dropout; the test set prefers the opposite.
  def metrics(config):
    score = config.model.se_reduction / 10 - config.model.dropout_rate / 2
    return 0.5 + score, 0.9 - score

  trainer = FakeTrainer(metrics)
  for mode in search.MODES:
    result = search.run_search(tiny_config(), str(tmp_path / mode), mode, reductions=[1, 2, 4],
                               dropouts=[0.0, 0.1], stage1_dropout=0.1, report_test=True,
                               trainer=trainer)
    chosen = result['chosen']
    assert (chosen['model.se_reduction'], chosen['model.dropout_rate']) == (4, 0.0)
    test_best = max(result['runs'], key=lambda r: r['test']['accuracy'])
    assert (test_best['reduction'], test_best['dropout']) == (1, 0.1)
    assert 'Test accuracy (%, not used)' in (tmp_path / mode / 'search.md').read_text()
  assert all(config.evaluate_test for config, _ in trainer.calls)

  search.run_search(tiny_config(), str(tmp_path / 'plain'), reductions=[2], dropouts=[0.1],
                    trainer=trainer)
  assert not trainer.calls[-1][0].evaluate_test  # without --report_test the test set is not run


def test_two_stage_search_fixes_dropout_then_tunes_it(tmp_path):
  trainer = FakeTrainer(lambda c: (0.5 + (c.model.se_reduction == 2) / 4
                                   - abs(c.model.dropout_rate - 0.3) / 10, 0.5))
  config_file = tmp_path / 'base.py'
  config_file.write_text('from se_resnet_jax.config import base_config\n\n\ndef get_config():\n'
                         '  config = base_config()\n  config.num_epochs = 7\n  return config\n')
  workdir = tmp_path / 'two_stage'
  result = search.run_search(tiny_config(), str(workdir), 'two_stage', reductions=[1, 2, 4],
                             dropouts=[0.0, 0.3], stage1_dropout=0.5, config_file=str(config_file),
                             trainer=trainer)

  ran = [(c.model.se_reduction, c.model.dropout_rate) for c, _ in trainer.calls]
  assert ran == [(1, 0.5), (2, 0.5), (4, 0.5), (2, 0.0), (2, 0.3)]  # (2, 0.5) is not run twice
  assert [r['stage'] for r in result['runs']] == [1, 1, 1, 2, 2]
  chosen = result['chosen']
  assert (chosen['model.se_reduction'], chosen['model.dropout_rate']) == (2, 0.3)
  heat_map_rows = table_rows(workdir / 'search.md', '**')
  assert [row.count('|') for row in heat_map_rows] == [5, 5, 5]  # r x dropout {0, 0.3, 0.5}
  assert_png(workdir / 'search.png')

  # The chosen config starts from the given file (num_epochs 7 there, 4 in the searched config).
  chosen = load_config_file(result['chosen_config'])
  assert (chosen.num_epochs, chosen.model.se_reduction, chosen.model.dropout_rate) == (4, 2, 0.3)
  assert "BASE_CONFIG = '../base.py'" in (workdir / 'chosen_config.py').read_text()


@pytest.mark.parametrize('experiment', ['ablation', 'search', 'kfold'])
def test_killed_experiment_reruns_only_unfinished_runs(tmp_path, experiment):
  run = {
      'ablation': lambda trainer: ablation.run_ablation(
          tiny_config(), str(tmp_path), seeds=2, variants=['full', 'no_dropout'], trainer=trainer),
      'search': lambda trainer: search.run_search(
          tiny_config(), str(tmp_path), reductions=[1, 2], dropouts=[0.0, 0.1], trainer=trainer),
      'kfold': lambda trainer: kfold.run_kfold(
          tiny_config(), str(tmp_path), folds=2, settings=[(2, 0.1), (4, 0.0)], trainer=trainer),
  }[experiment]
  metrics = lambda c: (0.6 + c.seed / 100 + c.model.dropout_rate + c.kfold.fold / 50, 0.5)
  killed = FakeTrainer(metrics, kill_on_call=3)
  with pytest.raises(Killed):
    run(killed)
  assert len(killed.calls) == 3

  rerun = FakeTrainer(metrics)
  result = run(rerun)
  # Of 4 runs, the 2 finished ones are read back: the killed one is resumed, the last one starts.
  assert len(rerun.calls) == 2 and rerun.workdirs[0] == killed.workdirs[2]
  assert rerun.workdirs[1] not in killed.workdirs
  with open(tmp_path / f'{experiment}.json') as f:
    assert json.load(f) == json.loads(json.dumps(files.to_jsonable(result)))
  assert os.path.exists(tmp_path / f'{experiment}.md')
  assert_png(tmp_path / f'{experiment}.png')


def test_rerun_with_other_settings_is_refused(tmp_path):
  trainer = FakeTrainer(lambda c: (0.5, 0.5))
  search.run_search(tiny_config(), str(tmp_path), reductions=[2], dropouts=[0.1], trainer=trainer)
  with pytest.raises(common.RunConflictError) as conflict:
    search.run_search(tiny_config(num_epochs=5), str(tmp_path), reductions=[2], dropouts=[0.1],
                      trainer=trainer)
  assert conflict.value.run_dir == str(tmp_path / 'r2_p0.1')
  assert conflict.value.differences == {'num_epochs': (4, 5)}
  assert len(trainer.calls) == 1


def test_ablation_variants_and_deltas(tmp_path):
  accuracy = {'SEResNet18': 0.2, 'ResNet18': 0.0}
  trainer = FakeTrainer(lambda c: (0.5, 0.5 + accuracy[c.model.name] + 0.1 * c.augment.enabled
                                   + c.seed / 100))
  result = ablation.run_ablation(tiny_config(seed=5), str(tmp_path), seeds=2,
                                 variants=list(ablation.VARIANTS) + [ablation.ALL_OFF],
                                 trainer=trainer)
  assert sorted({c.seed for c, _ in trainer.calls}) == [5, 6]
  deltas = {v['name']: v['accuracy_delta'] for v in result['variants']}
  assert deltas['no_se']['mean'] == pytest.approx(-0.2)
  assert deltas['no_augmentation']['mean'] == pytest.approx(-0.1)
  assert deltas['no_dropout']['mean'] == pytest.approx(0.0)
  assert deltas['all_off']['mean'] == pytest.approx(-0.3)
  assert deltas['all_off']['std'] == pytest.approx(0.0)
  off = [c for c, w in trainer.calls if f'{os.sep}all_off{os.sep}' in w]
  assert {(c.model.name, c.model.dropout_rate, c.augment.enabled) for c in off} == {
      ('ResNet18', 0.0, False)}
  summary = table_rows(tmp_path / 'ablation.md', '`all_off` |')[0]
  assert '-30.00 ± 0.00' in summary
  # no_se loses 0.2 on both seeds: SE's gain is +0.2 with a zero-width interval (equal pairs).
  gain = result['se_gain']['accuracy']
  assert (gain['mean'], gain['low'], gain['high'], gain['df']) == pytest.approx((0.2, 0.2, 0.2, 1))
  assert result['se_gain']['loss']['mean'] == pytest.approx(0.2)  # lower loss counts as gain
  assert '[+20.00, +20.00]' in (tmp_path / 'ablation.md').read_text()


def test_senet_recipe_ablation_gives_se_gain_with_its_interval(tmp_path):
  """Issue 23's acceptance run with a fake trainer: the SENet paper's CIFAR recipe at SE-ResNet-20,
  full against no_se over 2 seeds whose gains differ, so the interval has a width."""
  config = common.with_values(load_config_file(os.path.join(REPO, 'configs', 'senet_cifar10.py')), {
      **{k: v for k, v in TINY.items() if k != 'model.dropout_rate'}, 'model.name': 'SEResNet20'})
  se_gain = lambda c: c.model.name.startswith('SE') * (0.1 + (c.seed - config.seed) / 20)
  trainer = FakeTrainer(lambda c: (0.5, 0.5 + se_gain(c)))
  workdir = str(tmp_path / 'senet')
  result = ablation.run_ablation(config, workdir, seeds=2, variants=['full', 'no_se'],
                                 trainer=trainer)
  assert {c.model.name for c, _ in trainer.calls} == {'SEResNet20', 'ResNet20'}
  gain = result['se_gain']
  assert (gain['model'], gain['baseline'], gain['split']) == ('SEResNet20', 'ResNet20', 'test')
  paired = [0.1, 0.15]
  assert gain['accuracy']['per_seed'] == pytest.approx(paired)
  half = 12.706204736 * np.std(paired, ddof=1) / np.sqrt(2)  # t(0.975, df=1)
  assert (gain['accuracy']['low'], gain['accuracy']['high']) == pytest.approx(
      (np.mean(paired) - half, np.mean(paired) + half))
  assert f'{100 * np.mean(paired):+.2f}' in ablation.closing_summary(workdir, result)


def test_bad_settings_fail_before_any_training(tmp_path):
  trainer = FakeTrainer(lambda c: (0.5, 0.5))
  with pytest.raises(ConfigError):  # r = 8 on 4 channels: the second cell's config is refused
    search.run_search(tiny_config(), str(tmp_path / 's'), reductions=[2, 8], dropouts=[0.1],
                      trainer=trainer)
  refused = [
      (lambda: ablation.run_ablation(tiny_config(**{'model.dropout_rate': 0.0}),
                                     str(tmp_path / 'a'), seeds=1, trainer=trainer),
       ('variants', 'no_dropout')),
      (lambda: ablation.run_ablation(tiny_config(), str(tmp_path / 'a'), seeds=0, trainer=trainer),
       ('seeds', 0)),
      (lambda: kfold.run_kfold(tiny_config(**{'model.name': 'ResNet18'}), str(tmp_path / 'k'),
                               folds=2, trainer=trainer), ('model.name', 'ResNet18')),
      (lambda: ablation.run_ablation(tiny_config(validation_size=0), str(tmp_path / 'a'), seeds=1,
                                     trainer=trainer), ('validation_size', 0)),
      (lambda: search.run_search(tiny_config(), str(tmp_path / 's'), mode='random',
                                 trainer=trainer), ('mode', 'random')),
      (lambda: kfold.parse_settings('16:0.5,2-0.1'), ('settings', '2-0.1')),
  ]
  for experiment, (field, value) in refused:
    with pytest.raises(common.SettingError) as error:
      experiment()
    assert (error.value.field, error.value.value) == (field, value)
  assert not trainer.calls
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'k')
  assert kfold.parse_settings('16:0.5, 8:0.3,') == [(16, 0.5), (8, 0.3)]


def test_preempted_run_stops_the_experiment(tmp_path):
  calls = []

  def sigterm_at_step_5(config, workdir):
    calls.append(workdir)
    raise Preempted(5, workdir)

  with pytest.raises(Preempted) as stop:
    kfold.run_kfold(tiny_config(), str(tmp_path), folds=2, trainer=sigterm_at_step_5)
  assert (stop.value.step, stop.value.workdir, stop.value.exit_code) == (5, calls[0], 0)
  assert len(calls) == 1  # no further run starts after a SIGTERM
