"""Start-up of every Python process the tests start (this folder is on their PYTHONPATH): fault injection."""

import jaxscale_faults

jaxscale_faults.install_on_import()
