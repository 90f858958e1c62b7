"""The plugin's own tests: tandem's compatibility suite, run against every component."""
from tandem.plugins.testing import check_plugin


def test_every_component_honours_tandems_contract():
    checked = check_plugin("example")
    assert {name for _, name in checked} == {"typical_p", "chunked", "int8_tensor"}
