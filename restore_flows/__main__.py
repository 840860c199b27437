from restore_flows.cli import main

main()
