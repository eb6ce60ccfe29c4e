from openpi_merge_plugin.cli.app import entrypoint

entrypoint()
