"""Small pieces every part of the plugin shares: seeding, module unwrapping, atomic checkpoint IO."""
