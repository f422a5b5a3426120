"""Every drop-file, message and manifest format a site reads or writes, writer beside parser."""
