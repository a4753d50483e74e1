from qemubox.cli import main

main()
