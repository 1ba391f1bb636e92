"""Device profiles: the built-in ort-cpu, YAML files, and every refusal as an InputError."""

import pytest

from compressor.errors import InputError
from compressor.latency.profiles import builtin_profiles, load_profile, parse_profile
from compressor.latency.timing import TimingPolicy

MINIMAL = "name: tiny\nruntime: onnxruntime\n"


def test_builtin_ort_cpu():
    p = load_profile("ort-cpu")
    assert p.name == "ort-cpu"
    assert p.runtime == "onnxruntime"
    assert p.device == "cpu"
    assert p.precision == "fp32"
    assert p.batch == 1
    assert p.opset == 17
    assert p.threads is None
    assert p.resolved_threads >= 1
    assert p.input_shape is None
    assert p.runtime_options == {}  # the runtime's defaults, spinning included
    assert (p.report_policy.min_runs, p.report_policy.min_time_s) == (200, 5.0)
    assert (p.search_policy.min_runs, p.search_policy.min_time_s) == (50, 1.0)
    # shared timing keys reach both levels
    for policy in (p.search_policy, p.report_policy):
        assert policy.warmup_runs == 10
        assert policy.warmup_s == 0.5
        assert policy.warn_iqr == 0.10
        assert policy.remeasure_iqr == 0.25
        assert policy.max_repeats == 3
    assert p.source == "builtin:ort-cpu"


def test_builtin_list_contains_ort_cpu():
    assert "ort-cpu" in builtin_profiles()


def test_to_dict_resolves_threads():
    p = load_profile("ort-cpu")
    d = p.to_dict()
    assert d["threads"] == p.resolved_threads
    assert d["search_policy"]["min_runs"] == 50
    assert d["report_policy"]["min_time_s"] == 5.0


def test_yaml_file_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nruntime: onnxruntime\nthreads: 2\nbatch: 4\ninput_shape: [3, 64, 48]\n"
        "timing:\n  min_runs: 7\n  search: {min_time_s: 0.25}\n  report: {min_runs: 9}\n"
    )
    p = load_profile(str(path))
    assert (p.name, p.runtime, p.threads, p.batch) == ("mine", "onnxruntime", 2, 4)
    assert p.resolved_threads == 2
    assert p.input_shape == (3, 64, 48)
    assert p.source == str(path)
    # level floors override shared keys, which override the defaults
    assert p.search_policy == TimingPolicy(min_runs=7, min_time_s=0.25)
    assert p.report_policy == TimingPolicy(min_runs=9, min_time_s=5.0)


def test_existing_file_without_yaml_suffix_loads(tmp_path):
    path = tmp_path / "profile.txt"
    path.write_text(MINIMAL)
    assert load_profile(str(path)).name == "tiny"


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nruntime: onnxruntime\nbatch: 1\n  threads: 2\n")
    with pytest.raises(InputError, match="line 4") as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_malformed_yaml_tab_names_the_line():
    with pytest.raises(InputError, match="line 2"):
        parse_profile("name: x\n\truntime: y\n", "t")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_yaml_not_a_mapping(text):
    with pytest.raises(InputError, match="mapping"):
        parse_profile(text, "t")


def test_missing_runtime_is_named():
    with pytest.raises(InputError, match="runtime"):
        parse_profile("name: x\nthreads: 2\n", "t")


def test_missing_name_is_named():
    with pytest.raises(InputError, match="name"):
        parse_profile("runtime: onnxruntime\n", "t")


@pytest.mark.parametrize("value", ["0", "-1", "two", "2.0", "true"])
def test_bad_threads(value):
    with pytest.raises(InputError, match="threads"):
        parse_profile(f"{MINIMAL}threads: {value}\n", "t")


@pytest.mark.parametrize("value", ["0", "-3", "one"])
def test_bad_batch(value):
    with pytest.raises(InputError, match="batch"):
        parse_profile(f"{MINIMAL}batch: {value}\n", "t")


@pytest.mark.parametrize("shape", ["[3, 32]", "[3, 32, 32, 1]", "[]", "[3, 0, 32]", "[3, 32, x]", "32"])
def test_bad_input_shape(shape):
    with pytest.raises(InputError, match="input_shape"):
        parse_profile(f"{MINIMAL}input_shape: {shape}\n", "t")


@pytest.mark.parametrize("timing", [
    "{search: {min_runs: 0}}", "{report: {min_runs: many}}", "{min_time_s: -1}", "[1, 2]",
])
def test_bad_timing(timing):
    with pytest.raises(InputError, match="timing"):
        parse_profile(f"{MINIMAL}timing: {timing}\n", "t")


@pytest.mark.parametrize("text", [
    pytest.param(f"{MINIMAL}timing: {{search: [1, 2]}}\n", id="level-is-list"),
    pytest.param(f"{MINIMAL}timing: {{warn_iqr: lots}}\n", id="warn-iqr-text"),
    pytest.param(f"{MINIMAL}input_shape: [3, 32, true]\n", id="shape-bool"),
    pytest.param("name: x\nruntime: null\n", id="runtime-null"),
])
def test_bad_values_are_refused(text):
    with pytest.raises(InputError):
        parse_profile(text, "t")


def test_runtime_options_must_be_a_mapping():
    with pytest.raises(InputError, match="runtime_options"):
        parse_profile(f"{MINIMAL}runtime_options: [1]\n", "t")


def test_unknown_name_lists_builtins():
    with pytest.raises(InputError, match="unknown profile 'no-such-profile'") as info:
        load_profile("no-such-profile")
    assert "ort-cpu" in str(info.value)


@pytest.mark.parametrize("name", ["absent.yaml", "absent.yml"])
def test_nonexistent_yaml_path(tmp_path, name):
    with pytest.raises(InputError, match="not found"):
        load_profile(str(tmp_path / name))


def test_yaml_path_that_is_a_folder(tmp_path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(InputError, match="not found"):
        load_profile(str(folder))
