"""What an administrator does to a site from outside its daemon: create it (`init`, with the
installation it lays out, the lab cloud and the sample builder), ask for work through the SMS
Provider's procedures (`actions`), wait for a state (`waiting`), read its status (`status`),
remove a package (`reset`, CMUpdateReset). The front ends (the CLI, the console, the lab,
cmlab.testing) call it; it never imports the daemon or a component."""
