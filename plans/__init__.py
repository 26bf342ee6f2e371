"""Architecture presets (JSON) shipped with the plugin; see nnssl_joint.presets_io."""
