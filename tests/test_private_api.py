"""The other libraries' private names xray-train uses still exist and still do what it relies on: an upgrade
that moves one fails here, by name, instead of silently in a training run."""

import torch

from xray_train.private_api import (
    compile_count,
    is_compiled,
    maybe_mark_dynamic,
    uncompile,
    wrap_compiled_call,
)


def test_the_compiled_call_is_where_the_wrapper_looks_and_runs_through_it():
    layer = torch.nn.Linear(3, 3)
    assert not is_compiled(layer)
    layer.compile(backend="eager")
    assert is_compiled(layer)
    seen = []

    def wrap(compiled):
        def call(*args, **kwargs):
            seen.append(args[0].shape)
            return compiled(*args, **kwargs)

        return call

    wrap_compiled_call(layer, wrap)
    x = torch.randn(2, 3)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert seen == [x.shape]  # every call of the module went through the wrapper
    uncompile(layer)
    assert not is_compiled(layer)
    layer(x)
    assert seen == [x.shape]  # eager again: the compiled call (and its wrapper) is gone


def test_wrapping_a_module_that_was_not_compiled_fails_loudly():
    import pytest

    from xray_train.private_api import PrivateNameMoved

    with pytest.raises(PrivateNameMoved, match="_compiled_call_impl"):
        wrap_compiled_call(torch.nn.Linear(2, 2), lambda c: c)


def test_a_dynamic_mark_and_the_compile_counter_work():
    torch._dynamo.reset()
    f = torch.compile(lambda t: t * 2, backend="eager")
    before = compile_count()
    a = torch.randn(2, 5)
    maybe_mark_dynamic(a, 1)
    f(a)
    assert compile_count() == before + 1
    f(torch.randn(2, 7))  # the marked size is dynamic: no second graph
    assert compile_count() == before + 1
