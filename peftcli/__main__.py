from peftcli.cli import main

main()
