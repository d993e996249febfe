"""rtdlm.export: turning trained parameters into deployable artefacts."""
