"""tandem.orchestration: Ray actors, placement and the `tandem serve` launcher.
Built by the pipeline issue (#6)."""
