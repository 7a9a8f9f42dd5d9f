import pytest

from talan_serve.hosts import HOSTS, PAPER_TABLE_6, count_parameters


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_preset_size_at_real_host_shape(name):
    talan, backbone = count_parameters(name)
    paper_params, _ = PAPER_TABLE_6[name]
    assert talan / backbone < 0.01  # the paper's bar: under 1% of the backbone
    assert abs(talan - paper_params) / paper_params < 0.05  # Table 6's count, to its rounding
