"""tandem.plugins: pluggy hookspecs and the built-in attention, sampler and quantizer plugins.
Built by the plugins issue (#4)."""
