"""Built-in plugins. Import as robench.plugins.X, never as plugins.X."""
