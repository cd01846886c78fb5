from transfer_service.app import main

raise SystemExit(main())
