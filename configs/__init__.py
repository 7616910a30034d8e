"""Config files (`get_config(arg=None) -> ConfigDict`); `configs.base` holds the shared pieces."""
