"""torch_utils.safe_pickle: tensors, arrays and containers load; anything else is refused unrun."""

import collections
import io
import os
import pickle

import numpy as np
import pytest
import torch

from torch_utils import safe_pickle

class _Payload:
    """Unpickling it would create the marker file."""
    def __init__(self, marker):
        self.marker = marker
    def __reduce__(self):
        return (open, (self.marker, 'w'))

@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_tensors_arrays_and_containers_round_trip(protocol):
    obj = dict(t=torch.randn(2, 3), p=torch.nn.Parameter(torch.ones(2)), h=torch.zeros(2, dtype=torch.bfloat16),
               od=collections.OrderedDict(a=1), a=np.arange(3, dtype=np.int16), s=torch.Size([1, 2]),
               dtype=torch.float16, scalar=np.float32(2.5), set={1, 2}, raw=b'xy')
    out = safe_pickle.load(pickle.dumps(obj, protocol=protocol))
    assert torch.equal(out['t'], obj['t']) and isinstance(out['p'], torch.nn.Parameter)
    assert out['h'].dtype == torch.bfloat16 and out['dtype'] is torch.float16 and out['s'] == torch.Size([1, 2])
    assert out['a'].dtype == np.int16 and out['a'].tolist() == [0, 1, 2] and out['scalar'] == np.float32(2.5)
    assert isinstance(out['od'], collections.OrderedDict) and out['set'] == {1, 2} and out['raw'] == b'xy'

def test_unknown_global_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / 'ran'
    data = pickle.dumps({'x': _Payload(str(marker))})
    with pytest.raises(safe_pickle.UnsafePickleError, match=r'evil\.pkl.*io\.open'):
        safe_pickle.load(data, source='evil.pkl')
    assert not marker.exists()
    # The dry run that lists globals calls nothing either.
    assert ('io', 'open') in safe_pickle.globals_of(data)
    assert not marker.exists()

def test_nested_storage_archive_is_held_to_weights_only(tmp_path):
    marker = tmp_path / 'ran'
    inner = io.BytesIO()
    torch.save({'x': _Payload(str(marker))}, inner)
    from torch.storage import _load_from_bytes

    class Storage:
        def __reduce__(self):
            return (_load_from_bytes, (inner.getvalue(),))
    with pytest.raises(pickle.UnpicklingError):
        safe_pickle.load(pickle.dumps(Storage()))
    assert not marker.exists()

def test_allowed_and_resolved_globals():
    data = pickle.dumps(collections.Counter('aab'))
    with pytest.raises(safe_pickle.UnsafePickleError):
        safe_pickle.load(data)
    assert safe_pickle.load(data, allowed={('collections', 'Counter'): collections.Counter}) == {'a': 2, 'b': 1}
    assert safe_pickle.load(data, resolve=lambda m, n: dict if (m, n) == ('collections', 'Counter') else None) == {'a': 2, 'b': 1}
    assert not os.path.exists('never')
