"""Shared fixtures: every module under tests/support/ is loaded as a pytest plugin."""
import pkgutil

import tests.support as _support

pytest_plugins = [f"tests.support.{m.name}" for m in pkgutil.iter_modules(_support.__path__)]
