"""fairseq criteria; every module of this folder is imported (and so registered) by
:func:`scalegrad.fairseq_plugin.register`."""
