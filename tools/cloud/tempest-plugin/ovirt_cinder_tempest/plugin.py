"""Tempest plugin: where Tempest finds the tests of this package."""

import os

from tempest.test_discover import plugins


class Plugin(plugins.TempestPlugin):
    def load_tests(self):
        here = os.path.dirname(os.path.abspath(__file__))
        return os.path.join(here, "api"), os.path.dirname(here)

    def register_opts(self, conf):
        pass

    def get_opt_lists(self):
        return []
