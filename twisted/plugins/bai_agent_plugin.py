from twisted.application.service import ServiceMaker

bai_agent = ServiceMaker("bai-agent", "bai_agent.tap", "Backend.AI-style worker agent", "bai-agent")
