"""One module or folder per emulated ConfigMgr component.

Components talk only through drop files and the site database; each imports only
`cmlab.site` and `cmlab.core`, never another component. Only `cmlab.daemon` imports them.
"""
