"""The public surface is deliberate: everything in __all__ exists and nothing else is exported by accident."""

import winnow

SUBMODULES = {"cli", "config", "engine", "errors", "inputs", "layers", "llm", "models", "outputs", "params", "runner"}


def test_exported_members():
    public = {name for name in dir(winnow) if not name.startswith("_")}
    # `server` appears once something imports winnow.server; it is a subpackage, not an export.
    assert public - SUBMODULES - {"server"} == set(winnow.__all__) - {"__version__"}


def test_errors_are_value_errors_where_users_cause_them():
    for cls in (winnow.InvalidInputError, winnow.ConfigError, winnow.ModelLoadError, winnow.PromptTooLongError):
        assert issubclass(cls, ValueError)
