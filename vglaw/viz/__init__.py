"""Pictures of answers and runs: overlays (`overlay`), explanation figures (`explain`), charts (`plots`)."""
