"""Sampling through a prior (sampling/prior_sampling.py, generate.py --prior, train_prior.py)."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sampling.generation import generate_batches
from sampling.choosers import TemperatureChooser, TopKChooser
from sampling.prior_sampling import PriorChooser, sample_with_prior
from training import prior as prior_lib
from training import prior_files
from training import prior_rule
from training.ddl import LayerInfo
from training.networks import DDNGenerator, batch_invariant
from training.prior import FrequencyPrior, TransformerPrior
from training.prior_rule import PriorRule

# A tiny 16x16 network: L = 5 layers of K = 8.
def _net(seed=0):
    torch.manual_seed(seed)
    return DDNGenerator(16, 1, max_channels=8, max_blockn=1, max_outputk=8).eval().requires_grad_(False)

def _prior(ks, seed=0):
    torch.manual_seed(seed)
    p = TransformerPrior(ks, dim=16, depth=1, heads=2, dropout=0.0)
    with torch.no_grad():
        for param in p.parameters():
            param.add_(torch.randn_like(param))
    return p.eval().requires_grad_(False)

def _images_and_codes(batches):
    batches = list(batches)
    return torch.cat([b.images for b in batches]), torch.cat([b.codes for b in batches])

# A scorer that does not distinguish any candidates, and one that does (distance to a fixed image).
def _flat_scorer(cand, info):
    return torch.zeros(cand.shape[:2])

def _l2_scorer(cand, info):
    target = torch.linspace(-1, 1, cand.shape[-1])[None, None, None, :].expand_as(cand)
    return (cand - target).square().mean((2, 3, 4))

def test_uniform_prior_gives_todays_samples():
    net = _net()
    seeds = list(range(12))
    plain = _images_and_codes(generate_batches(net, seeds, batch=5))
    uniform = _images_and_codes(generate_batches(net, seeds, batch=5, prior=PriorRule(FrequencyPrior(net.ks))))
    assert torch.equal(plain[1], uniform[1]) and torch.equal(plain[0], uniform[0])

def test_prior_samples_are_per_seed():
    net = _net()
    rule = PriorRule(_prior(net.ks), temperature=0.9, top_p=0.9)
    seeds = list(range(11))
    whole = _images_and_codes(generate_batches(net, seeds, batch=11, prior=rule))
    parts = _images_and_codes(generate_batches(net, seeds, batch=4, prior=rule))
    assert torch.equal(whole[1], parts[1]) and torch.equal(whole[0], parts[0])
    # The codes are the prior's, and decoding them gives the images.
    assert torch.equal(whole[1], prior_rule.sample(rule.prior, net.seed_uniforms(seeds), 0.9, 0, 0.9))
    uniform = _images_and_codes(generate_batches(net, seeds, batch=11))
    assert not torch.equal(whole[1], uniform[1])

def test_flat_scorer_with_prior_is_the_prior_sample():
    # A scorer that ranks nothing leaves the prior's own sample, for every guided rule.
    net = _net()
    rule = PriorRule(_prior(net.ks), temperature=0.7)
    seeds = list(range(9))
    with batch_invariant():
        expected = sample_with_prior(net, seeds, rule).codes
        for chooser in (None, TemperatureChooser(0.5), TopKChooser(3)):
            got = sample_with_prior(net, seeds, rule, scorer=_flat_scorer, chooser=chooser).codes
            assert torch.equal(got, expected), chooser

def test_guided_argmin_with_prior():
    net = _net()
    seeds = list(range(9))
    with batch_invariant():
        guided = net(seeds=seeds, scorer=_l2_scorer).codes
        # Without restriction the prior only breaks exact ties: the plain guided argmin.
        with_prior = sample_with_prior(net, seeds, PriorRule(_prior(net.ks)), scorer=_l2_scorer).codes
        assert torch.equal(with_prior, guided)
        # With top-k = 1 the prior allows one code per layer: its most probable, whatever the guide.
        rule = PriorRule(_prior(net.ks), top_k=1)
        forced = sample_with_prior(net, seeds, rule, scorer=_l2_scorer).codes
        assert torch.equal(forced, prior_rule.sample(rule.prior, net.seed_uniforms(seeds), temperature=0))
        assert not torch.equal(forced, guided)

def test_guided_temperature_weighs_prior_and_guide():
    # softmax(log p / T - z / tau): a huge tau leaves the prior, a tiny tau the guide's argmin.
    net = _net()
    rule = PriorRule(_prior(net.ks))
    seeds = list(range(16))
    with batch_invariant():
        prior_only = sample_with_prior(net, seeds, rule).codes
        loose = sample_with_prior(net, seeds, rule, scorer=_l2_scorer, chooser=TemperatureChooser(1e9)).codes
        tight = sample_with_prior(net, seeds, rule, scorer=_l2_scorer, chooser=TemperatureChooser(1e-9)).codes
        guided = net(seeds=seeds, scorer=_l2_scorer).codes
    assert torch.equal(loose, prior_only)
    assert torch.equal(tight, guided)

def test_prior_chooser_needs_layers_in_order():
    rule = PriorRule(FrequencyPrior([4, 4, 4]))
    chooser = PriorChooser(rule)
    with pytest.raises(ValueError, match='before layer 0'):
        chooser(torch.zeros(2, 4), LayerInfo(1, 3, 4, 8), None)
    with pytest.raises(ValueError, match='argmin, temperature or top-k'):
        PriorChooser(rule, chooser=lambda d, i, u: d.argmin(1))

# ----------------------------------------------------------------------------
# The scripts, in this process (click's runner).

def _run(script, args):
    import importlib
    from click.testing import CliRunner
    module = importlib.import_module(script)
    result = CliRunner().invoke(module.main, [str(a) for a in args])
    return result.exit_code, result.output

@pytest.fixture(scope='module')
def snapshot_with_prior(tmp_path_factory):
    from training.snapshot import save_network_safe
    root = tmp_path_factory.mktemp('prior')
    path = root / 'network-snapshot-000000.safetensors'
    save_network_safe(_net(), path)
    return root, path

def test_train_prior_then_generate(snapshot_with_prior):
    root, net_path = snapshot_with_prior
    code, output = _run('train_prior', [f'--network={root}', '--max-images=300', '--steps=30', '--eval-every=10',
                                        '--dim=16', '--depth=1', '--heads=2', '--samples=50'])
    assert code == 0, output
    assert 'held-out bits/image: uniform 15.00  frequency' in output
    prior_file = root / 'network-snapshot-000000.prior.safetensors'
    report = prior_files.prior_metadata(prior_file.read_bytes())['report']
    assert report['num_train'] == 270 and report['num_held_out'] == 30 and report['prior_bits'] < 15
    assert output.strip().splitlines()[-1] == f'prior_bits={report["prior_bits"]:.4f}'

    # generate.py: auto finds it, off does not.
    codes = {}
    for mode in ('auto', 'off'):
        out = root / f'out-{mode}'
        code, output = _run('generate', [f'--network={net_path}', f'--outdir={out}', '--seeds=0-15', f'--prior={mode}', '--device=cpu'])
        assert code == 0, output
        opts = json.loads((out / 'generation_options.json').read_text())
        codes[mode] = np.load(out / 'latents.npz')['codes']
        if mode == 'auto':
            assert 'Prior: ' in output and opts['prior']['path'] == str(prior_file)
        else:
            assert opts['prior'] is None
    prior = prior_files.load_prior(prior_file)
    net = _net()
    assert (codes['auto'] == prior_rule.sample(prior, net.seed_uniforms(range(16))).numpy()).all()
    assert (codes['off'] == net.sample_codes(range(16)).numpy()).all()

def test_generate_prior_usage_errors(snapshot_with_prior, tmp_path):
    root, net_path = snapshot_with_prior
    code, output = _run('generate', [f'--network={net_path}', f'--outdir={tmp_path / "a"}', '--prior=off', '--prior-temp=0.5'])
    assert code != 0 and 'need a prior' in output
    code, output = _run('generate', [f'--network={net_path}', f'--outdir={tmp_path / "b"}', f'--prior={net_path}'])
    assert code != 0 and 'not a prior file' in output
    other = tmp_path / 'other.prior.safetensors'
    prior_files.save_prior(FrequencyPrior([8] * 4), other)
    code, output = _run('generate', [f'--network={net_path}', f'--outdir={tmp_path / "c"}', f'--prior={other}'])
    assert code != 0 and 'the prior is for 4 layers' in output
    code, output = _run('generate', [f'--network={net_path}', f'--outdir={tmp_path / "d"}', '--reconstruct=digits',
                                     '--prior-temp=0.5'])
    assert code != 0 and 'do not apply with --reconstruct' in output
    code, output = _run('generate', [f'--network={net_path}', f'--outdir={tmp_path / "e"}', f'--codes={tmp_path / "x.npz"}',
                                     f'--prior={other}'])
    assert code != 0 and 'does not apply with --codes' in output

def test_reconstruct_reports_prior_bits(snapshot_with_prior, tmp_path):
    root, net_path = snapshot_with_prior
    prior_file = tmp_path / 'p.prior.safetensors'
    prior = _prior([8] * 5)
    prior_files.save_prior(prior, prior_file)
    out = tmp_path / 'rec'
    code, output = _run('generate', [f'--network={net_path}', f'--outdir={out}', '--reconstruct=digits', '--max-images=20',
                                     f'--prior={prior_file}'])
    assert code == 0, output
    metrics = json.loads((out / 'metrics.json').read_text())
    codes = np.load(out / 'latents.npz')['codes']
    assert metrics['prior_bits'] == pytest.approx(prior_lib.bits_per_image(prior, torch.from_numpy(codes)))
    assert metrics['uniform_bits'] == pytest.approx(15.0) and f'prior_bits={metrics["prior_bits"]:g}' in output

def test_zscg_with_prior(snapshot_with_prior, tmp_path):
    root, net_path = snapshot_with_prior
    prior_file = tmp_path / 'p.prior.safetensors'
    prior_files.save_prior(_prior([8] * 5), prior_file)
    outputs = {}
    for prior in (str(prior_file), 'off'):
        code, output = _run('zscg', [f'--network={net_path}', '--task=superres', '--images=0-1', '--seeds=0-2',
                                     f'--out={tmp_path / f"z-{len(outputs)}.png"}', f'--prior={prior}', '--device=cpu', '--cell=16'])
        assert code == 0, output
        outputs[prior] = output
    assert 'Prior: ' in outputs[str(prior_file)] and 'Prior: ' not in outputs['off']
    # The unguided distance is that of other samples (the prior's).
    assert outputs[str(prior_file)].split('guided vs')[1] != outputs['off'].split('guided vs')[1]

def test_readme_prior_commands(tmp_path, monkeypatch):
    # The README's commands of "A prior over the codes", as written, at tiny scale, in this process.
    import importlib
    from PIL import Image
    from test_readme_workflows import adapt, readme
    from training.snapshot import save_network_safe
    monkeypatch.chdir(tmp_path)
    run = tmp_path / 'run'
    save_network_safe(_net(), run / 'network-snapshot-000000.safetensors')
    Image.new('L', (4, 4), 128).save(tmp_path / 'low8x8.png')
    tiny = dict(RUN=str(run))
    def invoke(fragment, set_=None, add=()):
        argv, _ = adapt(readme(fragment), set_=set_, add=add, placeholders=tiny)
        module = importlib.import_module(os.path.basename(argv[1])[:-3])
        result = CliRunner().invoke(module.main, argv[2:])
        assert result.exit_code == 0, f'{argv}\n{result.output}\n{result.exception!r}'
        return result.output
    out = invoke('train_prior.py --network RUN', set_={'--steps': '10'}, add=['--max-images=200', '--samples=20'])
    assert 'prior_bits=' in out and (run / 'network-snapshot-000000.prior.safetensors').is_file()
    out = invoke('train_prior.py --kind mixture', set_={'--steps': '10'}, add=['--max-images=200', '--samples=20'])
    assert 'mixture' in out and type(prior_files.load_prior(run / 'network-snapshot-000000.prior.safetensors')).__name__ == 'MixturePrior'
    assert 'Prior: ' in invoke('--outdir out/prior --seeds 0-63 --prior auto', set_={'--seeds': '0-3'})
    assert 'Prior: ' not in invoke('--outdir out/uniform --seeds 0-63 --prior off', set_={'--seeds': '0-3'})
    assert 'Prior: ' in invoke('--outdir out/prior-sr', set_={'--seeds': '0-1'})
    out = invoke('train.py --outdir=training-runs --prior=transformer', set_={'--prior-images': '100', '--prior-steps': '5'},
                 add=['--duration=0.0005', '--batch=50', '--max-channels=8', '--max-blockn=1', '--max-outputk=8', '--tick=0.5',
                      '--snap=1', '--workers=0', '--seed=0'])
    assert 'held-out bits/image' in out

def test_demo_logic_with_prior():
    from sampling import interactive
    net = _net()
    rule = PriorRule(_prior(net.ks), temperature=0.8)
    seeds = [3, 1, 4]
    result = interactive.run_guided(net, _l2_scorer, seeds, prior=rule)
    with batch_invariant():
        expected_plain = sample_with_prior(net, seeds, rule)
        expected_guided = sample_with_prior(net, seeds, rule, scorer=_l2_scorer)
    assert torch.equal(result.unguided, expected_plain.images) and torch.equal(result.guided, expected_guided.images)
    assert torch.equal(result.codes, expected_guided.codes) and len(result.path) == net.num_layers
    unguided_only = interactive.run_guided(net, None, seeds, prior=rule)
    assert torch.equal(unguided_only.guided, expected_plain.images)
