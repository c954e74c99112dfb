"""jaxscale."""
