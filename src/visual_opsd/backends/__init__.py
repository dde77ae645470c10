"""Model families behind one small interface (`base.Backend`): the built-in miniature unified model."""
